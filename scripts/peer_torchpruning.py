"""Width-prune a checkpoint with torch-pruning, the structured-pruning peer of llmprune.

Runs inside .venv-peer-tp (made by scripts/peer_tp_env.sh), never in the project venv: it
must not import llmprune. The recipe is that of torch-pruning's examples/LLMs/prune_llm.py:
group L2 magnitude importance, local (per-group) ranking, the hidden size, the query heads
(prune_num_heads, head_pruning_ratio = pruning_ratio) and the MLP channels all cut by one
ratio, round_to=4, lm_head ignored as a root; then the config is edited so the model runs.

For each target fraction of the dense parameter count, the pruning ratio is found first by
bisection on the parameter count, which needs no data: the pruned widths depend only on the
ratio (local pruning, a fixed channel count per group), so a one-layer copy with random
weights is pruned and the full model's count is taken from the resulting config. The real
model is then pruned once, scored on the evaluation windows llmprune saved (a LongTensor
(n, T), torch.save), saved with save_pretrained and reloaded with from_pretrained.

    .venv-peer-tp/bin/python scripts/peer_torchpruning.py --model DIR --windows eval.pt \
        --targets 0.9,0.8,0.7 --work /tmp/tp-out --json eval/peer-torchpruning.json

Two workarounds are needed for torch-pruning 1.6.1 with torch 2.13 / transformers 5.24
(see eval/peer-torchpruning.md): graph construction never ends unless
constants.MAX_VALID_DIM is raised (torch now reports a concat's dim=-1 as 2**64 - 1, which
torch-pruning takes for a channel concat, so rotate_half's cat shifts indices on every pass
round a cycle), and the graph must be traced with eager attention (SDPA's enable_gqa joins
the 576 query channels to the 192 key channels as one element-wise op).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata as md
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

# The Hub is out of reach here; fail fast instead of retrying connections.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch_pruning as tp  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel  # noqa: E402

log = logging.getLogger("peer_torchpruning")

ROUND_TO = 4  # as in the example
EXAMPLE_TEXT = "Hello world."  # the example's tracing input (a few tokens; the graph does not depend on length)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF checkpoint folder (float32 Llama-family)")
    p.add_argument("--windows", required=True, help="torch.save'd LongTensor (n, T) of evaluation token ids")
    p.add_argument("--targets", default="0.9,0.8,0.7", help="fractions of the dense parameter count")
    p.add_argument("--tolerance", type=float, default=0.02, help="largest accepted |achieved - target|")
    p.add_argument("--work", default="/tmp/peer-torchpruning", help="folder for the saved pruned models")
    p.add_argument("--json", default="eval/peer-torchpruning.json")
    p.add_argument("--no-dim-fix", action="store_true",
                   help="leave torch-pruning's MAX_VALID_DIM as shipped (graph construction then does not end)")
    p.add_argument("--skip-dense", action="store_true", help="do not score the dense model")
    p.add_argument("--no-eval", action="store_true", help="prune and time only: no perplexity, no save")
    p.add_argument("--loadable", action="store_true",
                   help="only ratios whose pruned config transformers accepts (hidden size a multiple of the heads)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# The example's recipe


def head_counts(model: PreTrainedModel) -> dict[torch.nn.Module, int]:
    """Heads per projection, as the example passes them (query heads and KV heads, GQA)."""
    cfg = model.config
    heads: dict[torch.nn.Module, int] = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            heads[m.q_proj] = cfg.num_attention_heads
            heads[m.k_proj] = cfg.num_key_value_heads
            heads[m.v_proj] = cfg.num_key_value_heads
    return heads


def build_pruner(model: PreTrainedModel, example: torch.Tensor, ratio: float) -> tp.pruner.MetaPruner:
    """MetaPruner (torch-pruning 1.6.1's name for BasePruner) set up as examples/LLMs/prune_llm.py."""
    return tp.pruner.MetaPruner(
        model,
        example_inputs=example,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False,
        # use_cache=False: no KV-cache concat in the traced graph
        forward_fn=lambda m, x: m(x, use_cache=False),
        output_transform=lambda out: out.logits,
        pruning_ratio=ratio,
        ignored_layers=[model.lm_head],
        num_heads=head_counts(model),
        prune_num_heads=True,
        prune_head_dims=False,  # whole heads only, so RoPE's head_dim stays
        head_pruning_ratio=ratio,
        round_to=ROUND_TO,
    )


def prune(pruner: tp.pruner.MetaPruner) -> int:
    groups = 0
    for group in pruner.step(interactive=True):
        group.prune()
        groups += 1
    return groups


def update_config(model: PreTrainedModel) -> dict[str, int]:
    """Write the pruned widths into the config (shared by every layer) and the attention modules.

    Differs from the example only where transformers 5 needs it: head_dim is kept explicit (not
    hidden_size // heads) and num_key_value_groups is set on every attention module.
    """
    cfg = model.config
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    mlp = [m for n, m in model.named_modules() if n.endswith("mlp")]
    head_dim = attn[0].head_dim
    widths = {
        "hidden_size": model.get_input_embeddings().weight.shape[1],
        "num_attention_heads": attn[0].q_proj.out_features // head_dim,
        "num_key_value_heads": attn[0].k_proj.out_features // head_dim,
        "intermediate_size": mlp[0].gate_proj.out_features,
    }
    uniform = {(m.q_proj.out_features, m.k_proj.out_features) for m in attn} | {(m.gate_proj.out_features, 0) for m in mlp}
    if len(uniform) != 2:
        raise SystemExit(f"layers were not pruned uniformly: {sorted(uniform)}")
    for key, value in widths.items():
        setattr(cfg, key, value)
    cfg.head_dim = head_dim
    for m in attn:
        m.num_key_value_groups = widths["num_attention_heads"] // widths["num_key_value_heads"]
    return widths


def retie(model: PreTrainedModel) -> bool:
    """Tie lm_head to the embeddings again; True if pruning had untied them.

    torch-pruning replaces each pruned weight by a new Parameter, so the tied embedding matrix
    becomes two (equal) matrices, one pruned as the embedding's output, one as lm_head's input.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not model.config.tie_word_embeddings or head.weight is emb.weight:
        return False
    if not torch.equal(head.weight, emb.weight):
        raise SystemExit("lm_head and embeddings differ after pruning: not the same channels kept")
    head.weight = emb.weight
    return True


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters once


# --------------------------------------------------------------------------------------------
# Choosing the ratio per target from parameter counts alone


class ParamSearch:
    """Full-model parameter count after pruning at a ratio, from a one-layer random proxy."""

    def __init__(self, config: PretrainedConfig, example: torch.Tensor):
        self.config, self.example = config, example
        self.probes: dict[float, int] = {}
        self.configs: dict[float, PretrainedConfig] = {}

    def params(self, ratio: float) -> int:
        if ratio not in self.probes:
            self.configs[ratio] = self._pruned_config(ratio)
            self.probes[ratio] = count_params(self._full_model_on_meta(self.configs[ratio]))
        return self.probes[ratio]

    def loadable(self, ratio: float) -> bool:
        """Whether transformers accepts the pruned config (it validates on save and on load)."""
        self.params(ratio)
        try:
            self.configs[ratio].validate()
        except Exception:  # transformers' strict validators raise their own error classes
            return False
        return True

    def _pruned_config(self, ratio: float) -> PretrainedConfig:
        cfg = copy.deepcopy(self.config)
        cfg.num_hidden_layers = 1
        torch.manual_seed(0)
        proxy = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
        prune(build_pruner(proxy, self.example, ratio))
        update_config(proxy)
        pruned = copy.deepcopy(proxy.config)
        pruned.num_hidden_layers = self.config.num_hidden_layers
        return pruned

    @staticmethod
    def _full_model_on_meta(cfg: PretrainedConfig) -> PreTrainedModel:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)

    def ratio_for(self, goal: int, low: float = 0.0, high: float = 0.6, steps: int = 14) -> float:
        """The ratio whose count is nearest ``goal`` (the count only falls as the ratio grows)."""
        for _ in range(steps):
            mid = round((low + high) / 2, 6)
            if self.params(mid) > goal:
                low = mid
            else:
                high = mid
        return min((low, high), key=lambda r: abs(self.params(r) - goal))

    def loadable_ratio_for(self, goal: int, around: float, reach: int = 6) -> float | None:
        """The loadable ratio nearest ``goal``, among hidden sizes within ``reach`` rounding steps of ``around``'s.

        torch-pruning keeps floor(H * (1 - r)) hidden channels rounded down to ROUND_TO, so the
        ratios 1 - (h + f) / H, 0 <= f < ROUND_TO, all keep h; the two ends of that band are tried
        (the MLP keeps more channels at its low end).
        """
        dense_hidden, hidden = self.config.hidden_size, self.configs[around].hidden_size
        sizes = range(hidden - reach * ROUND_TO, hidden + (reach + 1) * ROUND_TO, ROUND_TO)
        ratios = [around] + [round(1 - (h + f) / dense_hidden, 6)
                             for h in sizes if 0 < h <= dense_hidden for f in (0.01, ROUND_TO - 0.01)]
        ok = [r for r in ratios if self.loadable(r)]
        return min(ok, key=lambda r: abs(self.params(r) - goal)) if ok else None


# --------------------------------------------------------------------------------------------
# Measuring


@torch.inference_mode()
def perplexity(model: PreTrainedModel, windows: torch.Tensor) -> float:
    """exp(total NLL / predicted tokens); a window of T tokens predicts T - 1 (llmprune's measure)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, ids in enumerate(windows):
        logits = model(ids[None], use_cache=False).logits[0, :-1].float()  # (T - 1, V)
        total += F.cross_entropy(logits, ids[1:], reduction="sum").double()
        if (i + 1) % 8 == 0:
            log.info("  window %d/%d, running ppl %.3f", i + 1, len(windows),
                     math.exp(total.item() / ((i + 1) * (windows.shape[1] - 1))))
    return math.exp(total.item() / (windows.shape[0] * (windows.shape[1] - 1)))


def load_dense(folder: str, attn: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).eval()


@torch.inference_mode()
def save_and_reload(model: PreTrainedModel, tokenizer, out: Path, probe: torch.Tensor) -> dict:
    """save_pretrained, then plain from_pretrained; the outcome and how close the reload computes."""
    result: dict = {"folder": str(out)}
    shutil.rmtree(out, ignore_errors=True)
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        result["saved"] = True
        result["bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    except Exception as err:  # report whatever transformers says, and go on
        result.update(saved=False, error=f"{type(err).__name__}: {err}")
        return result
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    except Exception as err:
        result.update(reloaded=False, error=f"{type(err).__name__}: {err}")
        return result
    want = model(probe[None], use_cache=False).logits
    got = reloaded(probe[None], use_cache=False).logits
    result.update(reloaded=True, params=count_params(reloaded),
                  max_abs_logit_diff=float((want - got).abs().max()), probe_tokens=probe.numel())
    return result


def run_target(args: argparse.Namespace, target: float, dense_params: int, search: ParamSearch,
               windows: torch.Tensor, tokenizer) -> dict:
    goal = round(target * dense_params)
    start = time.perf_counter()
    ratio = search.ratio_for(goal)
    if args.loadable:
        nearest = ratio
        ratio = search.loadable_ratio_for(goal, around=nearest)
        if ratio is None:
            raise SystemExit(f"no loadable ratio near {nearest} for target {target}")
    row: dict = {"target": target, "ratio": ratio, "loadable_search": args.loadable, "search_s": round(time.perf_counter() - start, 1),
                 "predicted_params": search.params(ratio)}
    log.info("target %.2f: ratio %.6f, predicted %d parameters", target, ratio, row["predicted_params"])

    model = load_dense(args.model, attn="eager")
    row["load_average_before"] = os.getloadavg()
    # wall seconds, and this process's CPU seconds (what waiting for a core on a shared machine does not inflate)
    start, cpu = time.perf_counter(), time.process_time()
    pruner = build_pruner(model, search.example, ratio)
    row["graph_s"], row["graph_cpu_s"] = round(time.perf_counter() - start, 2), round(time.process_time() - cpu, 2)
    start, cpu = time.perf_counter(), time.process_time()
    row["groups"] = prune(pruner)
    row["config_after"] = update_config(model)
    row["untied_by_pruning"] = retie(model)
    row["prune_s"], row["prune_cpu_s"] = round(time.perf_counter() - start, 2), round(time.process_time() - cpu, 2)
    row["load_average_after"] = os.getloadavg()
    del pruner
    row["params"] = count_params(model)
    row["fraction"] = round(row["params"] / dense_params, 4)
    row["within_tolerance"] = abs(row["fraction"] - target) <= args.tolerance
    log.info("pruned: %s, %d parameters (%.4f of dense), graph %.1f s, prune %.1f s",
             row["config_after"], row["params"], row["fraction"], row["graph_s"], row["prune_s"])

    if args.no_eval:
        return row
    model.set_attn_implementation("sdpa")  # scored as llmprune scores (its default attention)
    start = time.perf_counter()
    row["ppl"] = perplexity(model, windows)
    row["eval_s"] = round(time.perf_counter() - start, 1)
    log.info("target %.2f: perplexity %.3f", target, row["ppl"])
    name = f"tp-{round(target * 100)}{'-loadable' if args.loadable else ''}"
    row["save"] = save_and_reload(model, tokenizer, Path(args.work) / name, windows[0, :128])
    log.info("save/reload: %s", row["save"])
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.no_dim_fix:
        tp.dependency.constants.MAX_VALID_DIM = 2**64  # every dim other than 1 counts as "not a channel dim"
    windows = torch.load(args.windows)
    if not (isinstance(windows, torch.Tensor) and windows.dim() == 2 and not windows.is_floating_point()):
        raise SystemExit(f"{args.windows}: expected an integer tensor (n, T)")
    windows = windows.long()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    example = torch.tensor([tokenizer.encode(EXAMPLE_TEXT)])
    config = AutoConfig.from_pretrained(args.model)

    report: dict = {
        "tool": "torch-pruning", "version": md.version("torch-pruning"), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": shlex.join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "model": args.model,
        "windows": {"file": args.windows, "shape": list(windows.shape),
                    "sha256": hashlib.sha256(Path(args.windows).read_bytes()).hexdigest(),
                    "predicted_tokens": windows.shape[0] * (windows.shape[1] - 1)},
        "recipe": {"importance": "GroupMagnitudeImportance(p=2, group_reduction='mean')", "pruner": "MetaPruner",
                   "global_pruning": False, "prune_num_heads": True, "prune_head_dims": False,
                   "head_pruning_ratio": "= pruning_ratio", "round_to": ROUND_TO, "ignored_layers": ["lm_head"],
                   "example_input": f"{EXAMPLE_TEXT!r}, {example.shape[1]} tokens", "trace_attention": "eager",
                   "max_valid_dim_patched": not args.no_dim_fix},
        "dense": {}, "targets": [],
    }

    def save() -> None:  # after every stage, so a cut-short run keeps what it measured
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    dense = load_dense(args.model, attn="sdpa")
    report["dense"]["params"] = dense_params = count_params(dense)
    if not (args.skip_dense or args.no_eval):
        start = time.perf_counter()
        report["dense"]["ppl"] = perplexity(dense, windows)
        report["dense"]["eval_s"] = round(time.perf_counter() - start, 1)
        log.info("dense: %d parameters, perplexity %.3f", dense_params, report["dense"]["ppl"])
    del dense
    save()

    search = ParamSearch(config, example)
    for target in (float(t) for t in args.targets.split(",")):
        report["targets"].append(run_target(args, target, dense_params, search, windows, tokenizer))
        report["search_probes"] = {str(r): n for r, n in sorted(search.probes.items())}
        save()
    print(json.dumps({t["target"]: {k: t.get(k) for k in ("ratio", "params", "ppl", "graph_s", "prune_s")}
                      for t in report["targets"]}), flush=True)


if __name__ == "__main__":
    main()
