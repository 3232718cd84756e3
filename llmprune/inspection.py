"""What a checkpoint really holds: each decoder layer's matrices with shape, dtype, sparsity and N:M validity.

Tensors are read one at a time through ``checkpoint.Checkpoint`` and freed before the next, and
N:M groups are checked a block of rows at a time, so memory stays O(one tensor) whatever the
model's size. Tensors outside the decoder layers (embeddings, norms, head) are counted from the
shard headers without being read, except a multimodal model's linears outside its language model
(vision tower, projector), which are listed apart with their sparsity (``--prune-vision`` prunes them).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .arch import Layout, Linear, as_out_in
from .errors import LlmpruneError
from .masks import Pattern, is_n_m
from .progress import table, track
from .source import group_names, open_source
from .stream import Layer

log = logging.getLogger(__name__)

DEFAULT_N_M = ("2:4", "4:8")
ROWS_PER_CHECK = 1024  # N:M validity is checked this many output rows at a time


@dataclass
class MatrixReport:
    """One prunable matrix as stored."""
    name: str  # checkpoint tensor name
    linear: str  # module path inside the layer, e.g. "self_attn.q_proj" (outside the layers: the checkpoint path)
    layer: int | None  # None: outside the decoder layers (a vision tower's or projector's linear)
    shape: list[int]
    dtype: str
    numel: int
    zeros: int
    n_m: dict[str, bool]  # "2:4" -> every group of 4 along the input dim has >= 2 zeros

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class Report:
    """The whole inspection; ``to_dict`` is the ``--json`` form."""
    model: str
    folder: str
    n_m_checked: list[str]
    matrices: list[MatrixReport]
    num_layers: int
    other_params: int  # parameters outside the prunable matrices (embeddings, norms, head, biases)
    weights_bytes: int  # the safetensors shards
    folder_bytes: int  # everything in the folder
    dtypes: dict[str, int]  # dtype -> parameters stored in it
    recipe: dict | None = None  # the llmprune.json summary, when present
    layers: list[dict] = field(default_factory=list)
    # mixture of experts: {"layers": MoE layers, "per_layer": routed experts in each, "top_k": chosen per token}
    experts: dict | None = None
    # a multimodal model's linears outside the language model (vision tower, projector; --prune-vision)
    vision: list[MatrixReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("matrices", "vision"):
            for m, d in zip(getattr(self, key), out[key]):
                d["sparsity"] = m.sparsity
        out["totals"] = self.totals()
        return out

    def totals(self) -> dict:
        numel = sum(m.numel for m in self.matrices)
        zeros = sum(m.zeros for m in self.matrices)
        vision = sum(m.numel for m in self.vision)
        out = {"prunable_params": numel, "prunable_zeros": zeros,
               "prunable_sparsity": zeros / numel if numel else 0.0, "other_params": self.other_params,
               "params": numel + vision + self.other_params,
               "n_m": {p: all(m.n_m[p] for m in self.matrices) for p in self.n_m_checked}}
        if self.vision:
            out["vision"] = group_totals(self.vision, self.n_m_checked)
        return out


def group_totals(matrices: list[MatrixReport], n_m_checked: list[str]) -> dict:
    """Parameters, zeros, sparsity and N:M validity of a group of matrices (a layer, the vision linears)."""
    numel, zeros = sum(m.numel for m in matrices), sum(m.zeros for m in matrices)
    return {"params": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0,
            "n_m": {p: all(m.n_m[p] for m in matrices) for p in n_m_checked}}


def parse_n_m(text: str | tuple[str, ...] | list[str]) -> list[Pattern]:
    parts = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    patterns = [Pattern.parse(p) for p in parts if p]
    if any(p.kind != "nm" for p in patterns):
        raise LlmpruneError(f"--n-m takes N:M patterns such as 2:4,4:8, got {text!r}")
    return patterns


def n_m_valid(weight: torch.Tensor, pattern: Pattern) -> bool:
    """``masks.is_n_m`` over (out, in) ``weight``, a block of rows at a time (bounded extra memory)."""
    return all(is_n_m(block, pattern.n, pattern.m) for block in weight.split(ROWS_PER_CHECK))


def expert_reports(layout: Layout, index: int, tensors: dict[str, torch.Tensor], patterns: list[Pattern]
                   ) -> list[MatrixReport]:
    """One row per routed expert matrix of layer ``index`` (its checkpoint ``tensors`` given), named
    as the checkpoint stores it (``block_sparse_moe.experts.3.w1.weight``) or by its place in a fused
    tensor (``mlp.experts.gate_up_proj[3].gate``)."""
    if not tensors:
        return []
    prefix = layout.checkpoint_name(layout.layer_prefix(index))
    return [matrix_report(view, expert.name, Linear(expert.name[len(prefix):], False), index, patterns)
            for expert, view in Layer(index, tensors, layout).experts()]


def matrix_report(tensor: torch.Tensor, name: str, linear, layer: int | None, patterns: list[Pattern]) -> MatrixReport:
    weight = as_out_in(tensor, linear)
    zeros = tensor.numel() - int(torch.count_nonzero(tensor))
    return MatrixReport(name=name, linear=linear.name, layer=layer, shape=list(tensor.shape),
                        dtype=str(tensor.dtype).removeprefix("torch."), numel=tensor.numel(), zeros=zeros,
                        n_m={str(p): n_m_valid(weight, p) for p in patterns})


def recipe_summary(folder: Path) -> dict | None:
    """The parts of an llmprune.json worth showing, or None when there is none (or it is unreadable)."""
    path = folder / "llmprune.json"
    if not path.is_file():
        return None
    try:
        recipe = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("%s is unreadable; recipe not shown", path)
        return None
    cfg = recipe.get("config", {})
    keep = ("method", "pattern", "sparsity", "ratios", "schedule", "norm", "dtype", "prune_vision")
    out = {k: cfg[k] for k in keep if cfg.get(k) is not None}
    out.update({k: recipe[k] for k in ("created", "command") if recipe.get(k)})
    out["input"] = recipe.get("input", {}).get("model")
    if "sparsity" in recipe:
        out["achieved"] = recipe["sparsity"].get("overall")
    if "finetune" in recipe:
        out["finetuned"] = True
    return out


def inspect(model: str, revision: str | None = None, n_m: str | tuple[str, ...] = DEFAULT_N_M,
            progress: bool = True) -> Report:
    """Stream ``model`` (folder, Hub id or ``packaged:smollm2``) and report what its checkpoint holds."""
    patterns = parse_n_m(n_m)
    source = open_source(model, revision)
    checkpoint, layout = source.checkpoint, source.layout
    try:
        matrices = []
        per_layer = group_names(checkpoint, layout)[1]
        for index in track(range(layout.num_layers), "inspect", "layer", enabled=progress):
            for linear, name in layout.linear_names(index):
                if name in checkpoint:  # stored dense, or compressed (read back dense)
                    matrices.append(matrix_report(checkpoint.read(name), name, linear, index, patterns))
            matrices += expert_reports(layout, index, {n: checkpoint.read(n) for n in per_layer[index]}
                                       if layout.expert_matrices(index) else {}, patterns)
        vision = [matrix_report(checkpoint.read(name), name, Linear(name.removesuffix(".weight"), linear.transposed),
                                None, patterns) for linear, name in layout.outside_linears() if name in checkpoint]
    finally:
        checkpoint.close()
    # expert matrices count as prunable, and so do the tensors that hold them; the vision linears are listed apart
    prunable = {m.name for m in matrices + vision} | \
        {e.param for i in range(layout.num_layers) for e in layout.expert_matrices(i)}
    dtypes: dict[str, int] = {}
    other = 0
    for name in checkpoint.names:
        spec = checkpoint.spec(name)
        numel = math.prod(spec.shape)
        key = str(spec.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + numel
        other += 0 if name in prunable else numel
    report = Report(model=model, folder=str(source.folder), n_m_checked=[str(p) for p in patterns],
                    matrices=matrices, num_layers=layout.num_layers, other_params=other,
                    weights_bytes=checkpoint.nbytes, folder_bytes=folder_size(source.folder), dtypes=dtypes,
                    recipe=recipe_summary(source.folder), experts=expert_counts(layout), vision=vision)
    report.layers = layer_totals(report)
    return report


def expert_counts(layout: Layout) -> dict | None:
    """How many routed experts the MoE layers hold (None for a dense model)."""
    blocks = [b for per_layer in layout.moe for b in per_layer]
    if not blocks:
        return None
    counts = sorted({b.num_experts for b in blocks})
    return {"layers": sum(1 for per_layer in layout.moe if per_layer),
            "per_layer": counts[0] if len(counts) == 1 else counts,
            "top_k": next((b.top_k for b in blocks if b.top_k), None)}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def layer_totals(report: Report) -> list[dict]:
    """Per decoder layer: parameters, zeros, sparsity, and whether every matrix passes each N:M check."""
    return [{"layer": index, **group_totals([m for m in report.matrices if m.layer == index], report.n_m_checked)}
            for index in range(report.num_layers)]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render(report: Report) -> str:
    """The text table: one row per matrix, a total row per layer, then totals, size and recipe."""
    head = ["layer", "matrix", "shape", "dtype", "sparsity", *report.n_m_checked]
    rows = [head]
    for layer in report.layers:
        for m in (m for m in report.matrices if m.layer == layer["layer"]):
            rows.append([str(m.layer), m.linear, "x".join(map(str, m.shape)), m.dtype, f"{m.sparsity:.2%}",
                         *(_yes(m.n_m[p]) for p in report.n_m_checked)])
        rows.append(["", "(layer)", f"{layer['params']:,}", "", f"{layer['sparsity']:.2%}",
                     *(_yes(layer["n_m"][p]) for p in report.n_m_checked)])
    if report.vision:
        for m in report.vision:
            rows.append(["vision", m.linear, "x".join(map(str, m.shape)), m.dtype, f"{m.sparsity:.2%}",
                         *(_yes(m.n_m[p]) for p in report.n_m_checked)])
        group = group_totals(report.vision, report.n_m_checked)
        rows.append(["", "(vision)", f"{group['params']:,}", "", f"{group['sparsity']:.2%}",
                     *(_yes(group["n_m"][p]) for p in report.n_m_checked)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines + [""] + _footer(report))


def _footer(report: Report) -> list[str]:
    t = report.totals()
    valid = [p for p, ok in t["n_m"].items() if ok]
    rows = [
        ("model", f"{report.model} ({report.folder})"),
        ("decoder layers", f"{report.num_layers}, {len(report.matrices)} prunable matrices"),
        *([("routed experts", f"{report.experts['per_layer']} in each of {report.experts['layers']} MoE layers"
                              f"{', top-' + str(report.experts['top_k']) if report.experts['top_k'] else ''}")]
          if report.experts else []),
        ("prunable", f"{t['prunable_params']:,} parameters, {t['prunable_zeros']:,} zero ({t['prunable_sparsity']:.4%})"),
        ("N:M valid", ", ".join(valid) if valid else "none of " + ", ".join(report.n_m_checked)),
        *([("vision", f"{len(report.vision)} linears outside the language model, {t['vision']['params']:,} "
                      f"parameters, {t['vision']['zeros']:,} zero ({t['vision']['sparsity']:.4%})")]
          if report.vision else []),
        ("other", f"{t['other_params']:,} parameters (embeddings, norms, head, biases)"),
        ("dtypes", ", ".join(f"{k} {v:,}" for k, v in report.dtypes.items())),
        ("size on disk", f"{report.weights_bytes / 1e6:,.1f} MB of weights, {report.folder_bytes / 1e6:,.1f} MB in all"),
    ]
    if report.recipe:
        rows.append(("recipe", ", ".join(f"{k} {v}" for k, v in report.recipe.items() if k not in ("command",))))
        if report.recipe.get("command"):
            rows.append(("command", report.recipe["command"]))
    else:
        rows.append(("recipe", "none (no llmprune.json)"))
    return table(rows).splitlines()
