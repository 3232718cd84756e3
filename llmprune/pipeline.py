"""A pruning run from start to finish: resolve, plan, stream, write the folder, record the recipe.

All writing happens in a hidden temporary sibling of the output folder that is renamed into place
only when everything is written and flushed, so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch
import transformers
from transformers import GenerationConfig

from . import __version__, criteria, hub, memory, ratios, resume, sparse, structured
from .arch import Layout, Outer, as_out_in, layout_of, load_config
from .calibrate import CalibratedPruneStep, OutlierStep
from .checkpoint import Checkpoint, ShardWriter, SparseShardWriter, TensorSpec, fault_point, parse_size, resolve
from .config import PruneConfig, resolve_device
from .errors import LlmpruneError
from .masks import Pattern
from .stream import Activations, Layer, group_names, output_specs, run
from .stream import layers as stream_layers

log = logging.getLogger(__name__)

# Files of the input folder that are not copied: weights (rewritten), the card and recipe (new).
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_REPLACED = {"README.md", "llmprune.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
             "config.json", ".gitattributes"}


@dataclass
class Source:
    """An input model: its folder, checkpoint and layout."""

    folder: Path
    info: dict
    checkpoint: Checkpoint
    layout: Layout


def open_source(model: str, revision: str | None = None, stream_from_hub: bool = False) -> Source:
    """Resolve ``model`` and discover its structure; every failure is a one-line error.

    ``stream_from_hub``: a Hub id's shards are downloaded one at a time as they are read.
    """
    from .packaged import resolve_packaged

    packaged = resolve_packaged(model)
    folder, info = (packaged, {"model": model, "path": str(packaged)}) if packaged else \
        resolve(model, revision, weights=not stream_from_hub)
    if not (folder / "config.json").is_file():
        raise LlmpruneError(f"{folder} has no config.json: not a Hugging Face model folder")
    if stream_from_hub and "commit" in info:
        from .hubstream import HubCheckpoint

        checkpoint = HubCheckpoint(folder, model, info["commit"])
    else:
        checkpoint = Checkpoint(folder)
    layout = layout_of(load_config(str(folder)))
    layout.match_checkpoint(set(checkpoint.names))
    return Source(folder, info, checkpoint, layout)


def prunable_matrices(source: Source) -> list[ratios.Matrix]:
    out = []
    for index in range(source.layout.num_layers):
        for _, name in source.layout.linear_names(index):
            if name in source.checkpoint:
                out.append(ratios.Matrix(name, math.prod(source.checkpoint.spec(name).shape), index))
    return out


def plan_sparsity(cfg: PruneConfig, source: Source) -> dict[str, float]:
    """Target sparsity of every prunable matrix, checked against the pattern."""
    matrices = prunable_matrices(source)
    rules = ratios.load_rules(cfg.ratios) if cfg.ratios and cfg.ratios != "owl" else None
    schedule = ratios.parse_schedule(cfg.schedule) if cfg.schedule else None
    targets = ratios.assign(matrices, cfg.sparsity, rules, schedule, rules_source=f"ratio file {cfg.ratios}")
    pattern = cfg.parsed_pattern
    if pattern.kind == "nm":
        for name, s in targets.items():
            if s not in (0.0, pattern.sparsity):
                raise LlmpruneError(f"{name}: sparsity {s} cannot be reached with {pattern}: use 0 or {pattern.sparsity}")
        check_n_m_shapes(source, pattern, targets)
    return targets


def check_n_m_shapes(source: Source, pattern: Pattern, targets: dict[str, float]) -> None:
    """Refuse before writing anything when an input dimension is not a multiple of M."""
    for index in range(source.layout.num_layers):
        for linear, name in source.layout.linear_names(index):
            if targets.get(name):
                shape = source.checkpoint.spec(name).shape
                fan_in = shape[0] if linear.transposed else shape[1]
                if fan_in % pattern.m:
                    raise LlmpruneError(f"{name}: input dimension {fan_in} is not a multiple of M={pattern.m}")


@dataclass
class PruneStep:
    """Prune every targeted matrix of a layer with one criterion; count the zeros written."""

    criterion: object
    targets: dict[str, float]
    pattern: Pattern
    norm: str
    zeros: dict[str, int] = field(default_factory=dict)

    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        out = dict(layer.tensors)
        for linear, name in layer.linears():
            sparsity = self.targets.get(name, 0.0)
            if sparsity > 0:
                weight = as_out_in(out[name], linear)
                pruned, _ = self.criterion.prune(weight, sparsity, self.pattern, None, self.norm)
                out[name] = pruned.t() if linear.transposed else pruned
            self.zeros[name] = out[name].numel() - int(torch.count_nonzero(out[name]))
        return out


def default_output(cfg: PruneConfig) -> Path:
    stem = Path(cfg.model.rstrip("/")).name.replace("packaged:", "")
    label = cfg.pattern.replace(":", "of") if cfg.pattern != "unstructured" else f"{round(cfg.sparsity * 100)}"
    if cfg.parsed_pattern.structured:
        label = f"{cfg.pattern}{round(cfg.sparsity * 100)}"
    return Path(f"{stem}-{cfg.method}-{label}")


def check_output(output: Path, input_folder: Path, overwrite: bool) -> None:
    out, src = output.resolve(), input_folder.resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise LlmpruneError(f"output {output} overlaps the input folder {input_folder}; the input is never modified")
    if out.exists() and not out.is_dir():
        raise LlmpruneError(f"output {output} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LlmpruneError(f"output {output} exists and is not empty (use --overwrite to replace it)")


def make_temp_dir(output: Path) -> Path:
    parent = output.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=parent))
    except OSError as err:
        raise LlmpruneError(f"cannot write output {output}: {err.strerror}") from None


@contextmanager
def temp_output(output: Path) -> Iterator[Path]:
    """A hidden temporary sibling of ``output`` to write into, renamed to ``output`` when the block
    succeeds and removed whatever happens; write failures become one-line errors."""
    tmp = make_temp_dir(output)
    try:
        yield tmp
        replace_folder(tmp, output)
    except OSError as err:
        raise LlmpruneError(f"writing {output} failed: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def closing_on_error(writer: ShardWriter | SparseShardWriter) -> Iterator[None]:
    """Close the writer's files when the block fails (``writer.close`` is the success path)."""
    try:
        yield
    except BaseException:
        writer.abort()
        raise


def replace_folder(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` to ``output``; an old output is removed only after that."""
    out = output.resolve()
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_aux_files(src: Path, dst: Path, dtype: torch.dtype | None, compressed: list[str] | None = None) -> None:
    """Tokenizer, generation config and other small files; config.json with the output dtype and,
    for a sparse-bitmask output, the format and its ``compressed`` matrices (llmprune.sparse)."""
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(_NOT_COPIED) and path.name not in _REPLACED \
                and not path.name.startswith("."):
            shutil.copy2(path, dst / path.name)
    config = sparse.dense_config(json.loads((src / "config.json").read_text()))
    if compressed:
        config.update(sparse.format_config(compressed))
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not (dst / "generation_config.json").exists():
        GenerationConfig.from_model_config(load_config(str(src))).save_pretrained(dst)


def make_writer(folder: Path, specs: list[TensorSpec], compressed: dict[str, float], max_shard_size: str,
                resume: dict | None = None) -> ShardWriter | SparseShardWriter:
    """A dense writer, or a sparse-bitmask one when there are ``compressed`` matrices (name -> sparsity).

    ``resume``: the journalled writer state of an interrupted run ({} for a dense writer).
    """
    if compressed:
        return SparseShardWriter(folder, specs, compressed, parse_size(max_shard_size), resume)
    return ShardWriter(folder, specs, parse_size(max_shard_size), resume=resume is not None)


def save_summary(folder: Path, save_format: str, specs: list[TensorSpec]) -> dict:
    """How the weights were saved: the format, their bytes on disk, and the dense size for comparison."""
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"format": save_format, "bytes": stored, "dense_bytes": sum(s.nbytes for s in specs)}


def versions() -> dict[str, str]:
    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sparsity_summary(source: Source, targets: dict[str, float], zeros: dict[str, int]) -> dict:
    matrices = prunable_matrices(source)
    per_matrix, per_layer_num, per_layer_den = {}, [0] * source.layout.num_layers, [0] * source.layout.num_layers
    for m in matrices:
        per_matrix[m.name] = {"target": targets.get(m.name, 0.0), "achieved": zeros[m.name] / m.numel, "numel": m.numel}
        per_layer_num[m.layer] += zeros[m.name]
        per_layer_den[m.layer] += m.numel
    total = sum(per_layer_den)
    return {
        "overall": sum(per_layer_num) / total,
        "target_mean": sum(targets.get(m.name, 0.0) * m.numel for m in matrices) / total,
        "matrices_pruned": sum(1 for m in matrices if targets.get(m.name, 0.0) > 0),
        "layers": [n / d if d else 0.0 for n, d in zip(per_layer_num, per_layer_den)],
        "matrices": per_matrix,
    }


CALIB_BATCH = 8  # calibration windows per forward call on an accelerator (and the most on any device)
CPU_CHUNK_TOKENS = 1024  # tokens per forward call on the CPU, where small chunks stay in cache


def calibration_batch(device: torch.device, seqlen: int) -> int:
    """Calibration windows per forward call: 8 on an accelerator; on the CPU about 1024 tokens,
    measured 1.25x faster than 8 x 512 tokens for a SmolLM2 Wanda prune (elementwise operations
    on a chunk's activations then run from cache)."""
    if device.type != "cpu":
        return CALIB_BATCH
    return max(1, min(CALIB_BATCH, CPU_CHUNK_TOKENS // max(seqlen, 1)))


def calibration_seqlen(cfg: PruneConfig, source: Source) -> int:
    from .arch import context_length

    context = context_length(source.layout.config)
    return min(cfg.seqlen, context) if context else cfg.seqlen


def layer_needs(cfg: PruneConfig, source: Source) -> memory.LayerNeeds:
    """The big buffers of one layer step of ``cfg``, from the checkpoint's shapes and config."""
    criterion = criteria.get(cfg.method)
    calibrated = criterion.needs_calibration or cfg.ratios == "owl"
    _, per_layer = group_names(source.checkpoint, source.layout)
    spec = source.checkpoint.spec
    weights = max((sum(spec(n).nbytes for n in names) for names in per_layer), default=0)
    stats_bytes = getattr(criterion, "stats_bytes", None)
    stats = 0
    for index in range(source.layout.num_layers):
        shapes = [as_out_in(torch.empty(spec(n).shape, device="meta"), lin).shape
                  for lin, n in source.layout.linear_names(index) if n in source.checkpoint.location]
        work = 3 * max((spec(n).nbytes for _, n in source.layout.linear_names(index)
                        if n in source.checkpoint.location), default=0)  # scores, mask, pruned copy
        stats = max(stats, work + (sum(stats_bytes(*s) for s in shapes) if stats_bytes and calibrated else 0))
    text = source.layout.config.get_text_config()
    hidden = getattr(text, "hidden_size", 0)
    itemsize = spec(source.checkpoint.names[0]).dtype.itemsize
    seqlen = calibration_seqlen(cfg, source)
    width = 4 * hidden + 3 * (getattr(text, "intermediate_size", None) or 4 * hidden)
    transient = CALIB_BATCH * seqlen * width * itemsize if calibrated else 0
    states = cfg.nsamples * seqlen * hidden * itemsize if calibrated else 0
    return memory.LayerNeeds(weights, stats, transient, states)


def calibration_ids(cfg: PruneConfig, source: Source) -> torch.Tensor:
    """The calibration token windows (nsamples, seqlen), seqlen capped by the model's context."""
    from transformers import AutoTokenizer

    from . import data

    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    return data.calibration_samples(tokenizer, cfg.calib_data, cfg.nsamples, calibration_seqlen(cfg, source), cfg.seed)


def calibration_store(cfg: PruneConfig, source: Source, device: torch.device) -> torch.device:
    """Where calibration states live for passes that do not spill to disk (structured, sensitivity):
    the device when they fit its budget, else the CPU."""
    store = memory.activation_store(layer_needs(cfg, source), device, memory.parse_budget(cfg.max_memory),
                                    Path(os.devnull))
    return store if isinstance(store, torch.device) else torch.device("cpu")


def calibration(cfg: PruneConfig, source: Source, device: torch.device, store: torch.device | Path,
                ids: torch.Tensor | None = None) -> tuple[Outer, torch.Tensor]:
    """The model's embeddings and head and the calibration token windows (``ids`` when given;
    states kept on ``store``)."""
    if ids is None:
        ids = calibration_ids(cfg, source)
    outer = Outer(source.layout, source.checkpoint.read, device)
    log.info("calibration: %d windows of %d tokens from %s, states on %s", *ids.shape, cfg.calib_data, store)
    return outer, ids


def owl_targets(cfg: PruneConfig, source: Source, outer: Outer, ids: torch.Tensor, store: torch.device | Path,
                device: torch.device, progress: bool) -> tuple[dict[str, float], list[float]]:
    """OWL: a read-only pass over the dense layers measures outliers; ratios follow from them."""
    step = OutlierStep(Activations(outer, ids, calibration_batch(device, ids.shape[1]), store), cfg.owl_m)
    for layer in stream_layers(source.checkpoint, source.layout, device, desc="owl outliers", progress=progress):
        step(layer)
    targets = ratios.owl(prunable_matrices(source), cfg.sparsity, step.ratios, cfg.owl_lambda)
    per_layer = [targets[m.name] for m in prunable_matrices(source)]
    log.info("owl: layer sparsity from %.3f to %.3f", min(per_layer), max(per_layer))
    return targets, step.ratios


def evaluation_windows(cfg: PruneConfig, source: Source) -> torch.Tensor:
    from .evaluate import load_windows

    return load_windows(str(source.folder), cfg.eval, cfg.eval_seqlen, cfg.eval_max_windows)


def perplexity(folder: Path, windows: torch.Tensor, cfg: PruneConfig, progress: bool) -> dict:
    from .evaluate import evaluate

    result = evaluate(str(folder), cfg.eval, windows=windows, device=cfg.device, progress=progress,
                      max_memory=cfg.max_memory)
    return {"perplexity": result.perplexity, "mode": result.mode, "seconds": round(result.seconds, 2)}


def make_step(cfg: PruneConfig, source: Source, device: torch.device, store: torch.device | Path,
              targets: dict[str, float], journal: resume.Journal, recipe: dict,
              progress: bool, calib_ids: torch.Tensor | None = None) -> tuple[object, Activations | None]:
    """The engine step for ``cfg``, with its calibration activations when the criterion needs them."""
    criterion = criteria.get(cfg.method)
    if not (criterion.needs_calibration or cfg.ratios == "owl"):
        return PruneStep(criterion, targets, cfg.parsed_pattern, cfg.norm), None
    outer, ids = calibration(cfg, source, device, store, calib_ids)
    recipe["calibration"] = {"data": cfg.calib_data, "nsamples": ids.shape[0], "seqlen": ids.shape[1],
                             "seed": cfg.seed}
    if cfg.ratios == "owl":
        if "owl" not in journal.pre:
            owl, outliers = owl_targets(cfg, source, outer, ids, store, device, progress)
            journal.remember("owl", {"targets": owl, "outlier_ratios": outliers})
        targets = journal.pre["owl"]["targets"]
        recipe["owl"] = {"m": cfg.owl_m, "lambda": cfg.owl_lambda,
                         "outlier_ratios": journal.pre["owl"]["outlier_ratios"]}
    if not criterion.needs_calibration:
        return PruneStep(criterion, targets, cfg.parsed_pattern, cfg.norm), None
    acts = Activations(outer, ids, calibration_batch(device, ids.shape[1]), store)
    return CalibratedPruneStep(criterion, targets, cfg.parsed_pattern, cfg.norm, acts, cfg.true_sequential), acts


def stream_into(tmp: Path, cfg: PruneConfig, source: Source, step, acts: Activations | None,
                journal: resume.Journal, device: torch.device, progress: bool, specs: list[TensorSpec],
                compressed: dict[str, float], output_name: Callable[[TensorSpec], str | None] | None = None) -> None:
    """Write the pruned shards into ``tmp``, continuing after the journal's last completed layer.

    ``output_name`` maps an input tensor to its output name, or None when a structured step drops
    it (default: the same name).
    """
    outside, per_layer = group_names(source.checkpoint, source.layout)

    def written(names: list[str]) -> list[str]:
        if output_name is None:
            return names
        return [out for n in names if (out := output_name(source.checkpoint.spec(n))) is not None]

    outside_out, per_layer_out = written(outside), [written(names) for names in per_layer]
    done = journal.layers_done
    writer = make_writer(tmp, specs, compressed, cfg.max_shard_size, (journal.writer or {}) if done else None)
    try:
        if done:
            journal.verify(writer, next((names for names in reversed(per_layer_out[:done]) if names), outside_out))
            writer.mark_written(outside_out + [n for names in per_layer_out[:done] for n in names])
            journal.restore(step)
            if acts is not None:
                acts.load(journal.state_dir / journal.acts)
        run(source.checkpoint, source.layout, step, writer, device, cfg.torch_dtype, desc="prune", progress=progress,
            start=done, on_layer=journal.on_layer(writer, per_layer, outside_out, step, acts, per_layer_out))
        writer.close()
    finally:
        writer.abort()
    fault_point("finalize")


def prune(cfg: PruneConfig, command: str | None = None, progress: bool = True,
          calib_ids: torch.Tensor | None = None) -> dict:
    """Run ``cfg`` end to end; returns the recipe that is also written as llmprune.json.

    ``calib_ids``: calibration windows tokenised earlier (``calibration_ids``), for runs that share them.
    An interrupted run of the same options beside the output is continued (see ``resume``).
    """
    start = time.perf_counter()
    source = open_source(cfg.model, cfg.revision, cfg.stream_from_hub)
    output = Path(cfg.output) if cfg.output else default_output(cfg)
    check_output(output, source.folder, cfg.overwrite)
    targets = plan_sparsity(cfg, source)
    device = resolve_device(cfg.device)
    key = resume.run_key(cfg.to_dict(), source.checkpoint.fingerprint(), versions())
    spill = resume.partial_folder(output, key) / resume.STATE / "spill"
    store = memory.activation_store(layer_needs(cfg, source), device, memory.parse_budget(cfg.max_memory), spill)
    journal = resume.open_partial(output, key, cfg.resume)
    tmp, keep = journal.folder, False
    recipe: dict = {"format": "llmprune/1"}
    try:
        windows = evaluation_windows(cfg, source) if cfg.eval else None
        if windows is not None:
            if "eval_dense" not in journal.pre:
                journal.remember("eval_dense", perplexity(source.folder, windows, cfg, progress))
            recipe["eval"] = {"data": cfg.eval, "seqlen": windows.shape[1], "windows": windows.shape[0],
                              "dense": journal.pre["eval_dense"]}
        shrink, acts = None, None
        if cfg.parsed_pattern.structured:
            before = journal.pre.get("influence")  # a resumed layers run keeps its block influence
            if before is not None:
                recipe["calibration"] = before["calibration"]
            step = shrink = structured.plan(cfg, source, device, recipe, progress, before and before["scores"])
            if shrink.influence is not None and before is None:
                journal.remember("influence", {"scores": shrink.influence, "calibration": recipe["calibration"]})
            acts = shrink.acts
        else:
            step, acts = make_step(cfg, source, device, store, targets, journal, recipe, progress, calib_ids)
        if shrink is None:
            targets = step.targets  # OWL's, when it chose them
        if journal.layers_done:
            recipe["resumed_after_layers"] = journal.layers_done
        specs = output_specs(source.checkpoint, source.layout, cfg.torch_dtype)
        if shrink is not None:
            specs_in, specs = specs, shrink.specs(specs)
        compressed = {n: t for n, t in targets.items() if t > 0} if cfg.save_format == sparse.FORMAT else {}
        stream_into(tmp, cfg, source, step, acts, journal, device, progress, specs, compressed,
                    output_name=shrink and shrink.output_name)
        copy_aux_files(source.folder, tmp, cfg.torch_dtype, list(compressed))
        if shrink is not None:
            shrink.write_config(tmp)
        if windows is not None:
            pruned = perplexity(tmp, windows, cfg, progress)
            recipe["eval"]["pruned"] = pruned
            recipe["eval"]["ratio"] = pruned["perplexity"] / recipe["eval"]["dense"]["perplexity"]
        recipe.update({
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "input": {**source.info, "shards": source.checkpoint.fingerprint()},
            "config": cfg.to_dict(),
            "versions": versions(),
            "device": str(device),
            "sparsity": sparsity_summary(source, targets, step.zeros),
            "save": save_summary(tmp, cfg.save_format, specs),
        })
        if shrink is not None:
            recipe["structured"] = shrink.summary(specs_in, specs)
        recipe["wall_time_s"] = round(time.perf_counter() - start, 3)
        recipe["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if device.type == "cuda":
            recipe["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        recipe["plots"] = sparsity_chart(recipe, tmp)
        (tmp / "llmprune.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if cfg.finetune is not None and cfg.finetune.steps > 0:
            # The journal stays until the end: a run killed while fine-tuning resumes after its last
            # pruned layer and goes on with the fine-tune (block-wise: after its last journalled layer).
            fault_point("finetune")
            recipe = finetune_pruned(cfg, tmp, output, source, command, progress)
            (tmp / "llmprune.json").write_text(json.dumps(recipe, indent=2) + "\n")
        base = base_model_id(cfg.model, source)
        (tmp / "README.md").write_text(hub.model_card(recipe, base, hub.input_card_metadata(source.folder)))
        journal.finish()
        replace_folder(tmp, output)
    except KeyboardInterrupt:
        keep = True
        log.warning("interrupted after %d layers: rerun the same command to resume (%s)", journal.layers_done, tmp)
        raise
    except OSError as err:
        raise LlmpruneError(f"writing {output} failed: {err.strerror or err}") from None
    finally:
        source.checkpoint.close()
        if not keep and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    recipe["output"] = str(output)
    log.info("wrote %s", output)
    return recipe


def finetune_pruned(cfg: PruneConfig, tmp: Path, output: Path, source: Source, command: str | None,
                    progress: bool) -> dict:
    """Fine-tune the pruned model in ``tmp`` in place (its zeros kept); returns the merged recipe.

    Training text defaults to the calibration source, block-wise targets to this run's input, and the
    evaluation (when asked for) reuses the pruned model's perplexity on the same windows.
    """
    from dataclasses import replace

    from .finetune import finetune

    # This run holds the journal's lock on ``tmp``: what a killed fine-tune left beside it without a
    # journal to resume from (an old copy being replaced) is removed.
    for stale in tmp.parent.glob(f".{tmp.name}.*"):
        if not (stale / resume.STATE / "journal.json").is_file():
            log.info("removing %s, left by an interrupted fine-tune", stale)
            shutil.rmtree(stale, ignore_errors=True)
    ft = replace(cfg.finetune, model=str(tmp), output=str(tmp), overwrite=True, device=cfg.device, dtype=cfg.dtype,
                 max_shard_size=cfg.max_shard_size, data=cfg.finetune.data or cfg.calib_data,
                 dense=cfg.finetune.dense or str(source.folder), eval=cfg.eval, eval_seqlen=cfg.eval_seqlen,
                 eval_max_windows=cfg.eval_max_windows)
    recipe = finetune(ft, command=command, progress=progress)
    recipe.pop("output", None)
    recipe["finetune"]["config"].update(model=str(output), output=str(output))
    recipe["finetune"]["input"] = {"model": "the pruned model of this run"}
    return recipe


SPARSITY_CHART = "sparsity.png"


def sparsity_chart(recipe: dict, folder: Path) -> dict[str, str]:
    """The per-layer sparsity bar chart beside the model; without matplotlib, a warning and no chart."""
    from . import plots

    sp = recipe["sparsity"]
    kind = "owl" if "owl" in recipe else recipe["config"].get("schedule") or recipe["config"].get("ratios") or "uniform"
    try:
        plots.sparsity_bars(sp["layers"], sp["target_mean"], folder / SPARSITY_CHART,
                            f"{recipe['config']['method']}, {recipe['config']['pattern']}, {kind}: "
                            f"{sp['overall']:.1%} overall")
    except LlmpruneError as err:
        if str(err) != plots.NEEDS_MATPLOTLIB:
            raise
        log.warning("no sparsity chart: %s", err)
        return {}
    return {"sparsity": SPARSITY_CHART}


def base_model_id(model: str, source: Source) -> str | None:
    """The Hub id the output derives from, when there is one."""
    if model.startswith("packaged:"):
        return source.info.get("base_model") or "HuggingFaceTB/SmolLM2-135M-Instruct"
    if "commit" in source.info:
        return model
    meta = hub.input_card_metadata(source.folder).get("base_model")
    return meta if isinstance(meta, str) and hub.HUB_ID.match(meta) else None
