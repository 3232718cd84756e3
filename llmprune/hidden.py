"""``--pattern hidden``: remove dimensions of the residual stream, the same ones everywhere.

``units.Residual`` lists what runs along the width: embedding and head columns, every norm on the
stream, readers' input columns, writers' output rows. A first read-only pass over the dense model
scores each dimension (``WidthScoreStep``), the second writes the sliced tensors
(``structured.HiddenStep``), the ones outside the layers included. The norms divide by the root mean
square over the width, which the smaller model takes over d' < d dimensions: their weights are
scaled by sqrt(d / d'), so that the output computes what the dense model computes with the removed
dimensions zeroed in place (exactly, up to the norm's epsilon, which acts as if scaled by d' / d),
post-sub-block norms (Gemma 3) included, as those read writers' outputs that are zero there. An
embedding scaled with the width (Gemma's sqrt(hidden_size)) is rescaled to keep its output.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from . import masks
from .arch import Layout, ModelWithoutLayers, build_skeleton
from .calibrate import calibration
from .config import PruneConfig
from .errors import LlmpruneError
from .sizing import calibration_batch, calibration_store
from .source import Source
from .stream import Activations, Layer
from .stream import layers as stream_layers
from .structured import HiddenStep, Shrink, check_expressible
from .units import Residual, edited_config, embedding_scale, hidden_config_values, residual_of

log = logging.getLogger(__name__)

HIDDEN_SCORES = {
    "magnitude": "{norm} norm of the dimension's weights (embedding and head columns, readers' input columns, "
                 "writers' output rows)",
    "wanda": "output energy of the linears reading it, sum over them of ||W[:, i]||^2 ||x_i||^2 on calibration "
             "data (wanda), the head after the final norm included",
}


def dim_norms(t: torch.Tensor, dim: int, norm: str) -> torch.Tensor:
    """(t.shape[dim],) float64: the l1 norm, or the squared l2 norm, of each slice of ``t`` along ``dim``."""
    rows = t.float().movedim(dim, 0).reshape(t.shape[dim], -1)
    return (rows.abs().sum(1) if norm == "l1" else rows.square().sum(1)).double().cpu()


@dataclass
class WidthScoreStep:
    """Read-only pass over the dense model: a score for each residual dimension, summed over layers.

    Without ``acts`` the ``norm`` of the dimension's weights in each layer (readers' input columns,
    writers' output rows); with ``acts`` the output energy of every reader of the stream, sum over
    readers of ||W[:, i]||^2 times the sum over calibration tokens of its input x_i^2 (the norm's
    output), as the states pass through the layer.
    """
    layout: Layout
    residual: Residual
    norm: str
    acts: Activations | None = None
    scores: torch.Tensor = field(init=False)  # (hidden,) float64

    def __post_init__(self):
        self.scores = torch.zeros(self.residual.hidden, dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, layer: Layer) -> None:
        own = {}  # checkpoint name -> (dim along the width, role) of the layer's weights on the stream
        for name in layer.tensors:
            entry = self.residual.dims.get(self.layout.model_name(name))
            if entry is not None and entry[1] in ("reader", "writer") and name.endswith("weight"):
                own[name] = entry
        if self.acts is None:
            for name, (dim, _) in own.items():
                self.scores += dim_norms(layer.tensors[name], dim, self.norm)
            return
        module, prefix = layer.module(), self.layout.layer_prefix(layer.index)
        readers = {self.layout.model_name(n)[len(prefix):-len(".weight")]: (n, dim)
                   for n, (dim, role) in own.items() if role == "reader"}
        energy = {name: torch.zeros(self.residual.hidden, dtype=torch.float64) for name in readers}

        def hook(name: str, x: torch.Tensor) -> None:
            energy[name] += x.float().square().reshape(-1, x.shape[-1]).sum(0).double().cpu()

        handles = [module.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: hook(name, args[0])) for name in readers]
        try:
            self.acts.advance(module, layer.index)
        finally:
            for h in handles:
                h.remove()
        for name, (stored, dim) in readers.items():
            self.scores += dim_norms(layer.tensors[stored], dim, "l2") * energy[name]

    @torch.no_grad()
    def finish(self, outer: ModelWithoutLayers) -> None:
        """The head's share with calibration: its columns' energy times the final norm's output x_i^2."""
        finals = [n for n in self.residual.norms() if self.layout.layer_of(self.layout.checkpoint_name(n)) is None]
        head = outer.model.get_output_embeddings()
        if len(finals) != 1 or head is None:
            log.warning("hidden: no single final norm before the head; the head is left out of the ranking")
            return
        final = outer.model.get_submodule(finals[0].rsplit(".", 1)[0])
        energy = torch.zeros(self.residual.hidden, dtype=torch.float64)
        for i in range(len(self.acts.hidden)):
            y = final(self.acts.chunk(i))
            energy += y.float().square().reshape(-1, y.shape[-1]).sum(0).double().cpu()
        self.scores += dim_norms(head.weight, 1, "l2") * energy


def hidden_width(layout: Layout, hidden: int, ratio: float) -> int:
    """The kept residual width nearest to (1 - ``ratio``) x ``hidden`` (ties: the wider) among
    multiples of 8 (of 1 when ``hidden`` is not one) that the config class accepts (Llama and Gemma
    need hidden_size divisible by the head count); refuses one that removes nothing."""
    step = 8 if hidden % 8 == 0 else 1
    target = (1 - ratio) * hidden
    widths = sorted(range(step, hidden + 1, step), key=lambda w: (abs(w - target), -w))
    width = next((w for w in widths if _accepts(layout, w)), hidden)
    if width == hidden:
        below = next((w for w in range(hidden - step, 0, -step) if _accepts(layout, w)), None)
        hint = (f"; the smallest ratio that removes some is just above {(hidden - below) / (2 * hidden):.4g}"
                if below else "")
        raise LlmpruneError(f"--sparsity {ratio} removes none of the {hidden} hidden dimensions (the width is kept "
                            f"a multiple of {step} that {type(layout.config.get_text_config()).__name__} "
                            f"accepts){hint}")
    return width


def _accepts(layout: Layout, width: int) -> bool:
    try:
        edited_config(layout, hidden_config_values(layout, width))
    except LlmpruneError:
        return False
    return True


def _width_scores(cfg: PruneConfig, source: Source, device: torch.device, progress: bool, residual: Residual,
                  calib_ids: torch.Tensor | None = None) -> tuple[list[float], tuple[int, int] | None]:
    """The first pass: every residual dimension's score over the dense model, and the calibration
    (windows, tokens) it used (None for magnitude)."""
    layout, acts, outer = source.layout, None, None
    if cfg.method == "wanda":
        store = calibration_store(cfg, source, device)
        outer, ids = calibration(cfg, source, device, store, calib_ids)
        acts = Activations(outer, ids, calibration_batch(device, ids.shape[1]), store)
    step = WidthScoreStep(layout, residual, cfg.norm, acts)
    for layer in stream_layers(source.checkpoint, layout, device, desc="hidden scores", progress=progress):
        step(layer)
    if acts is not None:
        step.finish(outer)
    else:  # the embedding and an untied head, read from the checkpoint
        for model_name, (dim, role) in residual.dims.items():
            name = layout.checkpoint_name(model_name)
            if role in ("embedding", "head") and name in source.checkpoint:
                step.scores += dim_norms(source.checkpoint.read(name), dim, cfg.norm)
    scores = step.scores.sqrt() if acts is None and cfg.norm == "l2" else step.scores
    return scores.tolist(), acts.windows if acts is not None else None


def plan(cfg: PruneConfig, source: Source, device: torch.device, progress: bool,
                 scores: list[float] | None, calib_ids: torch.Tensor | None = None) -> Shrink:
    """Hidden width: the kept width and output config (checked against transformers, the tensors
    outside the layers included), the scoring pass (unless a resumed run passes its ``scores``), and
    the norms' and embedding's compensation."""
    layout = source.layout
    residual = residual_of(layout)
    d = residual.hidden
    width = hidden_width(layout, d, cfg.sparsity)
    values = hidden_config_values(layout, width)
    shapes = {i: {n: residual.shape(layout.layer_prefix(i) + n, tuple(p.shape), width)
                  for n, p in layout.layer_module(i).named_parameters()} for i in range(layout.num_layers)}
    outside = {n: residual.shape(n, tuple(p.shape), width) for n, p in layout.skeleton.named_parameters()
               if layout.layer_of(layout.checkpoint_name(n)) is None}
    check_expressible(layout, values, shapes, outside)
    calibrated = None
    if scores is None:
        scores, calibrated = _width_scores(cfg, source, device, progress, residual, calib_ids)
    keep = masks.units(torch.tensor(scores, dtype=torch.float64)[None], d - width)[0]
    # the norms see the mean square over ``width`` dimensions instead of d; a scaled embedding's
    # factor changes with the width, and a tied head carries it into the logits (the final norm undoes it)
    norm_factor = math.sqrt(d / width)
    embed = embedding_scale(layout.skeleton, d) / embedding_scale(build_skeleton(edited_config(layout, values)), width)
    factors = {n: norm_factor for n in residual.norms()}
    if embed != 1.0:
        factors.update({n: embed for n, (_, role) in residual.dims.items()
                        if role == "embedding" or (role == "head" and residual.tied)})
        if residual.tied:
            factors.update({n: norm_factor / embed for n in residual.norms()
                            if layout.layer_of(layout.checkpoint_name(n)) is None})
    step = HiddenStep(layout, residual, torch.nonzero(keep).squeeze(1), factors)
    text = layout.config.get_text_config()
    before = {k: getattr(text, k, None) for k in values}
    importance = HIDDEN_SCORES[cfg.method].format(norm=cfg.norm)
    log.info("hidden: keeping %d of %d residual dimensions (%s)", width, d, importance)
    return Shrink(layout, "hidden", cfg.sparsity, step, values, before, importance, scores, calibrated)
