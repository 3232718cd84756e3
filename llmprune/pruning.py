"""A pruning run from start to finish: resolve, plan, stream, write the folder, record the recipe.

All writing happens in a hidden temporary sibling of the output folder that is renamed into place
only when everything is written and flushed, so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import hidden, mix, resume, sparse, structured
from .card import base_model_id, input_card_metadata, model_card
from .checkpoint import TensorSpec
from .config import PruneConfig
from .devices import parse_budget, resolve_device
from .errors import LlmpruneError
from .faults import fault_point
from .finetuning.run import finetune
from .output import check_output, copy_aux_files, default_output, replace_folder
from .perplexity import evaluate, source_windows
from .plots import sparsity_chart
from .recipe import Recipe, peak_rss_mb, save_summary, sparsity_summary, versions, vision_summary
from .shards import make_writer
from .sizing import activation_store, layer_needs
from .source import Source, fused_experts, group_names, input_record, open_source
from .steps import make_step, plan_sparsity
from .stream import Activations, Step, output_specs, run

log = logging.getLogger(__name__)


def output_label(cfg: PruneConfig) -> str:
    """The default output's suffix: method and sparsity, N:M or structured pattern."""
    if cfg.target_params is not None:
        return f"{cfg.method}-params{str(cfg.target_params).strip()}"
    if cfg.parsed_pattern.kind == "mix":
        return f"{cfg.method}-{cfg.pattern.replace('=', '').replace(',', '-')}"
    if cfg.parsed_pattern.structured:
        return f"{cfg.method}-{cfg.pattern}{round(cfg.sparsity * 100)}"
    if cfg.pattern != "unstructured":
        return f"{cfg.method}-{cfg.pattern.replace(':', 'of')}"
    return f"{cfg.method}-{round(cfg.sparsity * 100)}"


def perplexity(folder: Path, windows: torch.Tensor, cfg: PruneConfig, progress: bool) -> dict:
    result = evaluate(str(folder), cfg.eval, windows=windows, device=cfg.device, progress=progress,
                      max_memory=cfg.max_memory)
    return {"perplexity": result.perplexity, "mode": result.mode, "seconds": round(result.seconds, 2)}


@dataclass
class Plan:
    """What streams: the engine step, its calibration states (when it has any), the per-matrix
    targets it prunes to, and for a structured pattern the shrinking step itself."""

    step: Step
    acts: Activations | None
    targets: dict[str, float]
    shrink: structured.Shrink | None = None


def plan_step(cfg: PruneConfig, source: Source, device: torch.device, targets: dict[str, float],
              journal: resume.Journal, recipe: Recipe, progress: bool, calib_ids: torch.Tensor | None) -> Plan:
    """The step for ``cfg``; results computed before the stream (OWL ratios, block influence) come
    from the journal when a resumed run has them."""
    if not cfg.structured:
        spill = journal.state_dir / "spill"
        store = activation_store(layer_needs(cfg, source), device, parse_budget(cfg.max_memory), spill)
        step, acts, calibrated = make_step(cfg, source, device, store, targets, journal, progress, calib_ids)
        recipe.calibration = calibration_section(cfg, calibrated)
        if cfg.ratios == "owl":
            recipe.owl = {"m": cfg.owl_m, "lambda": cfg.owl_lambda,
                          "outlier_ratios": journal.before.owl["outlier_ratios"]}
        return Plan(step, acts, step.targets)  # OWL's targets, when it chose them
    if cfg.target_params is not None or cfg.parsed_pattern.kind == "mix":
        shrink = mix.plan(cfg, source, device, progress, journal.before.mix)
        recipe.calibration = calibration_section(cfg, shrink.calibration)
        if journal.before.mix is None:
            journal.remember(mix=shrink.decision())
        return Plan(shrink, shrink.acts, shrunk_targets(shrink, source, targets), shrink)
    before = journal.before.influence  # a resumed layers or hidden run keeps its first pass's scores
    planner = hidden.plan if cfg.parsed_pattern.kind == "hidden" else structured.plan
    shrink = planner(cfg, source, device, progress, before and before["scores"], calib_ids)
    if shrink.kind not in ("layers", "experts"):
        targets = shrunk_targets(shrink, source, targets)
    recipe.calibration = before["calibration"] if before is not None else calibration_section(cfg, shrink.calibration)
    if shrink.influence is not None and before is None:
        journal.remember(influence={"scores": shrink.influence, "calibration": recipe.calibration})
    if shrink.kind == "experts":  # only routed experts go: every linear keeps all its weights
        layout = source.layout
        experts = {e.name for i in range(layout.num_layers) for e in layout.expert_matrices(i)}
        targets = {name: target if name in experts else 0.0 for name, target in targets.items()}
    return Plan(shrink, shrink.acts, targets, shrink)


def shrunk_targets(shrink: structured.Shrink, source: Source, targets: dict[str, float]) -> dict[str, float]:
    """Only the matrices whose units go have a target; the others keep every weight (0.0)."""
    return {name: target if shrinks(shrink, source, name) else 0.0 for name, target in targets.items()}


def shrinks(shrink: structured.Shrink, source: Source, name: str) -> bool:
    """Whether the structured step removes part of matrix ``name``."""
    spec = source.checkpoint.spec(name)
    out = shrink.spec(spec)
    return out is None or out.shape != spec.shape


def calibration_section(cfg: PruneConfig, windows: tuple[int, int] | None) -> dict | None:
    """llmprune.json's "calibration": the source and the (windows, tokens) actually used, or None."""
    if windows is None:
        return None
    return {"data": cfg.calib_data, "nsamples": windows[0], "seqlen": windows[1], "seed": cfg.seed}


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
                acts.load(journal.state_dir / journal.states_folder)
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
    source = open_source(cfg.model, cfg.revision, cfg.stream_from_hub, cfg.tokenizer)
    output = Path(cfg.output) if cfg.output else default_output(cfg.model, output_label(cfg))
    check_output(output, source.folder, cfg.overwrite)
    check_supported(cfg, source)
    targets = plan_sparsity(cfg, source)
    device = resolve_device(cfg.device)
    journal = resume.open_partial(output, resume.run_key(cfg.to_dict(), source.checkpoint.fingerprint(), versions()),
                                  cfg.resume, cfg.overwrite)
    tmp, keep, recipe = journal.folder, False, Recipe()
    try:
        windows = evaluation_windows(cfg, source, journal, recipe, progress)
        plan = plan_step(cfg, source, device, targets, journal, recipe, progress, calib_ids)
        if journal.layers_done:
            recipe.resumed_after_layers = journal.layers_done
        specs = write_model(tmp, cfg, source, plan, journal, device, progress)
        if windows is not None:
            recipe.eval["pruned"] = perplexity(tmp, windows, cfg, progress)
            recipe.eval["ratio"] = recipe.eval["pruned"]["perplexity"] / recipe.eval["dense"]["perplexity"]
        record_run(recipe, cfg, source, plan, specs, tmp, device, command, start)
        recipe.write(tmp)
        if cfg.finetune is not None and cfg.finetune.steps > 0:
            # The journal stays until the end: a run killed while fine-tuning resumes after its last
            # pruned layer and goes on with the fine-tune (block-wise: after its last journalled layer).
            fault_point("finetune")
            recipe = finetune_pruned(cfg, tmp, output, source, command, progress)
            recipe.write(tmp)
        base = base_model_id(cfg.model, source)
        (tmp / "README.md").write_text(model_card(recipe.to_dict(), base, input_card_metadata(source.folder)))
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
        journal.release()
    log.info("wrote %s", output)
    return {**recipe.to_dict(), "output": str(output)}


def check_supported(cfg: PruneConfig, source: Source) -> None:
    """Refuse, before anything is written, what would handle routed experts wrongly, and
    --prune-vision on a model with nothing to prune outside its language model."""
    if cfg.prune_vision and not source.layout.outside_linears():
        what = "no vision tower or projector" if not source.layout.outside_language_model() else \
            "no linear layers in its vision tower or projector"
        raise LlmpruneError(f"--prune-vision: {source.info.get('model', source.folder)} has {what}")
    experts = fused_experts(source)
    if cfg.parsed_pattern.kind == "experts":
        if not any(source.layout.moe):
            raise LlmpruneError("--pattern experts needs a mixture-of-experts model: "
                                f"{source.info.get('model', source.folder)} has no routed experts")
        return
    if not experts:
        return
    if cfg.structured:
        raise LlmpruneError(f"--pattern {cfg.pattern} is not supported on mixture-of-experts models yet: its "
                            f"{experts} routed expert matrices would be left out; use an unstructured or N:M pattern")
    if cfg.save_format != "dense" and any(name not in source.checkpoint for name in plan_sparsity(cfg, source)):
        raise LlmpruneError(f"--save-format {cfg.save_format} cannot store experts fused on disk yet: use "
                            "--save-format dense")


def evaluation_windows(cfg: PruneConfig, source: Source, journal: resume.Journal, recipe: Recipe,
                       progress: bool) -> torch.Tensor | None:
    """With --eval: the evaluation windows, and the input's perplexity on them in ``recipe.eval``."""
    if not cfg.eval:
        return None
    windows = source_windows(source, cfg.eval, cfg.eval_seqlen, cfg.eval_max_windows, option="--eval")
    if journal.before.eval_dense is None:
        journal.remember(eval_dense=perplexity(source.folder, windows, cfg, progress))
    recipe.eval = {"data": cfg.eval, "seqlen": windows.shape[1], "windows": windows.shape[0],
                   "dense": journal.before.eval_dense}
    return windows


def write_model(tmp: Path, cfg: PruneConfig, source: Source, plan: Plan, journal: resume.Journal,
                device: torch.device, progress: bool) -> list[TensorSpec]:
    """Stream the pruned weights into ``tmp`` with the input's small files and config; returns the
    written tensors' specs."""
    specs = output_specs(source.checkpoint, source.layout, cfg.torch_dtype)
    if plan.shrink is not None:
        specs = plan.shrink.specs(specs)
    compressed = {n: t for n, t in plan.targets.items() if t > 0} if cfg.save_format == sparse.FORMAT else {}
    stream_into(tmp, cfg, source, plan.step, plan.acts, journal, device, progress, specs, compressed,
                output_name=plan.shrink and plan.shrink.output_name)
    copy_aux_files(source.folder, tmp, source.layout.config, cfg.torch_dtype, list(compressed))
    if cfg.tokenizer is not None:  # the output carries the tokenizer it was calibrated with
        source.tokenizer().save_pretrained(str(tmp))
    if plan.shrink is not None:
        plan.shrink.write_config(tmp)
    return specs


def record_run(recipe: Recipe, cfg: PruneConfig, source: Source, plan: Plan, specs: list[TensorSpec], tmp: Path,
               device: torch.device, command: str | None, start: float) -> None:
    """Everything llmprune.json says about the run beyond what the steps recorded."""
    recipe.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    recipe.command = command
    recipe.input = input_record(source)
    recipe.config = cfg.to_dict()
    recipe.versions = versions()
    recipe.device = str(device)
    vision = vision_summary(source, plan.targets, plan.step.zeros) if cfg.prune_vision else None
    recipe.sparsity = sparsity_summary(source, plan.targets, plan.step.zeros, vision)
    recipe.save = save_summary(tmp, cfg.save_format, specs)
    if plan.shrink is not None:
        recipe.structured = plan.shrink.summary(output_specs(source.checkpoint, source.layout, cfg.torch_dtype),
                                                specs)
    recipe.wall_time_s = round(time.perf_counter() - start, 3)
    recipe.peak_rss_mb = round(peak_rss_mb(), 1)
    if device.type == "cuda":
        recipe.peak_gpu_mb = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    recipe.plots = sparsity_chart(recipe.to_dict(), tmp)


def finetune_pruned(cfg: PruneConfig, tmp: Path, output: Path, source: Source, command: str | None,
                    progress: bool) -> Recipe:
    """Fine-tune the pruned model in ``tmp`` in place (its zeros kept); returns the merged recipe.

    Training text defaults to the calibration source, block-wise targets to this run's input, and the
    evaluation (when asked for) reuses the pruned model's perplexity on the same windows.
    """
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
    recipe = Recipe.from_dict(finetune(ft, command=command, progress=progress))
    recipe.extra.pop("output", None)
    recipe.finetune["config"].update(model=str(output), output=str(output))
    recipe.finetune["input"] = {"model": "the pruned model of this run"}
    return recipe


