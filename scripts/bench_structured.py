"""What structured pruning buys: parameters, file size and CPU forward latency against dense.

For each model (the packaged SmolLM2-135M in float32, and a random Llama with TinyLlama-1.1B's
shapes in bfloat16), the script prunes MLP channels and attention heads at each ratio (magnitude,
l1) with the library's streamed engine, then measures, side by side in this one run: parameters,
safetensors bytes, and the latency of one float32 forward pass on the CPU, dense and pruned timed
alternately (ABAB...) so that load changes on a shared machine hit both alike; the fastest pass
of each counts (interference only adds time), all passes are in the JSON. For SmolLM2 it also
scores SOTU perplexity (the evaluation split, speeches from 2000 on) of every output, and of a few
after a short whole-model fine-tune on the training split.

Heads are removed in equal numbers from every KV group, so the ratio is rounded per group
(SmolLM2: 3 query heads per group, so 10% removes none and is refused; 20% and 30% remove one per
group). The table shows the achieved fraction.

    nice -n 19 python scripts/bench_structured.py                      # eval/structured.json + table
    python scripts/bench_structured.py --big-layers 4 --finetune ""   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmprune import prune
from llmprune.config import FinetuneConfig, PruneConfig
from llmprune.errors import LlmpruneError

# TinyLlama-1.1B's shapes: 22 layers of hidden 2048, MLP 5632, 32 query heads in 4 KV groups.
BIG = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
           num_hidden_layers=22, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def big_model(folder: Path, layers: int) -> Path:
    """A random Llama with 1B-model shapes, bfloat16 (weights drawn small so activations stay finite)."""
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **{**BIG, "num_hidden_layers": layers}, dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    state = {n: (torch.randn(p.shape) * 0.02 if p.dim() > 1 else torch.ones(p.shape)).to(torch.bfloat16)
             for n, p in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.save_pretrained(folder, max_shard_size="1GB")
    return folder


def file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def latency(dense, pruned, ids: torch.Tensor, repeats: int, clock=time.perf_counter) -> tuple[list[float], list[float]]:
    """Seconds of each forward pass of each model, timed alternately after a warm-up.

    ``clock`` time.process_time counts the CPU seconds the pass used, which waiting for a core on a
    loaded machine does not inflate (with one torch thread it is the one-core latency).
    """
    times: dict[int, list[float]] = {0: [], 1: []}
    for model in (dense, pruned):
        model(ids)
    for _ in range(repeats):
        for k, model in enumerate((dense, pruned)):
            start = clock()
            model(ids)
            times[k].append(clock() - start)
    return times[0], times[1]


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def measure_model(name: str, src: Path, work: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    dense = load(src)
    ids = torch.randint(0, dense.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    dense_params, dense_bytes = count_params(dense), file_bytes(src)
    rows.append({"model": name, "pattern": "dense", "ratio": 0.0, "params": dense_params, "bytes": dense_bytes})
    for pattern in ("channels", "heads"):
        for ratio in args.ratios:
            out = work / f"{name}-{pattern}{round(ratio * 100)}"
            row = {"model": name, "pattern": pattern, "ratio": ratio, "output": str(out)}
            rows.append(row)
            start = time.perf_counter()
            try:
                if args.reuse and (out / "llmprune.json").is_file():
                    recipe = json.loads((out / "llmprune.json").read_text())
                else:
                    recipe = prune(PruneConfig(model=str(src), pattern=pattern, sparsity=ratio, output=str(out),
                                               overwrite=True, device="cpu"), progress=False)
            except LlmpruneError as err:
                row["refused"] = str(err)
                print(f"{name} {pattern} {ratio}: refused: {err}", flush=True)
                continue
            row["prune_s"] = round(time.perf_counter() - start, 1)
            st = recipe["structured"]
            row["config"] = {k: v["after"] for k, v in st["config"].items()}
            pruned = load(out)
            row["params"], row["bytes"] = count_params(pruned), file_bytes(out)
            assert row["params"] == st["parameters"]["after"]
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            row["dense_times"], row["pruned_times"] = latency(dense, pruned, ids, args.repeats, clock)
            # the fastest pass: interference from other jobs only ever adds time
            row["dense_s"], row["pruned_s"] = min(row["dense_times"]), min(row["pruned_times"])
            del pruned
            print(json.dumps(row), flush=True)


def perplexities(rows: list[dict], src: Path, work: Path, args: argparse.Namespace) -> dict:
    from llmprune.perplexity import evaluate, load_windows
    from llmprune.finetuning import finetune

    windows = load_windows(str(src), "sotu", args.eval_seqlen, args.eval_windows)
    ppl = lambda folder: round(evaluate(str(folder), windows=windows, device="cpu", progress=False).perplexity, 3)
    result = {"windows": list(windows.shape), "dense": ppl(src)}
    print("dense perplexity", result["dense"], flush=True)
    for row in rows:
        if row["model"] == "smollm2" and "output" in row and "refused" not in row:
            row["ppl"] = ppl(row["output"])
            print(row["pattern"], row["ratio"], "perplexity", row["ppl"], flush=True)
    for spec in filter(None, args.finetune.split(",")):
        pattern, ratio = spec.split(":")
        row = next(r for r in rows if r["model"] == "smollm2" and r["pattern"] == pattern and r["ratio"] == float(ratio))
        out = Path(row["output"] + "-ft")
        start = time.perf_counter()
        finetune(FinetuneConfig(model=row["output"], output=str(out), overwrite=True, mode="whole",
                                steps=args.ft_steps, seqlen=256, batch_size=2, lr=5e-4, precision="bf16",
                                device="cpu", data="sotu"), progress=False)
        row["ft_s"] = round(time.perf_counter() - start, 1)
        row["ppl_ft"] = ppl(out)
        print(pattern, ratio, "fine-tuned perplexity", row["ppl_ft"], flush=True)
    return result


def table(rows: list[dict], ppl: dict | None) -> str:
    lines = ["| model | pruned | config after | parameters | x dense | file MB | x dense | latency ms (dense) | "
             "speed-up | SOTU ppl | after fine-tune |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    dense = {r["model"]: r for r in rows if r["pattern"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        if r["pattern"] == "dense":
            p = ppl["dense"] if ppl and r["model"] == "smollm2" else ""
            lines.append(f"| {r['model']} | dense | | {r['params']:,} | 1 | {r['bytes'] / 1e6:.1f} | 1 | | | {p} | |")
            continue
        what = f"{r['pattern']} {r['ratio']:.0%}"
        if "refused" in r:
            lines.append(f"| {r['model']} | {what} | refused: {r['refused']} | | | | | | | | |")
            continue
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(
            f"| {r['model']} | {what} | {cfg} | {r['params']:,} | {r['params'] / d['params']:.3f} | "
            f"{r['bytes'] / 1e6:.1f} | {r['bytes'] / d['bytes']:.3f} | {r['pruned_s'] * 1e3:.0f} ({r['dense_s'] * 1e3:.0f}) | "
            f"{r['dense_s'] / r['pruned_s']:.2f} | {r.get('ppl', '')} | {r.get('ppl_ft', '')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/llmprune-structured", help="folder for the pruned models")
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--big-layers", type=int, default=22, help="decoder layers of the 1B-shaped model (0: skip it)")
    p.add_argument("--tokens", type=int, default=128, help="tokens in the timed forward pass")
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes per model")
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--finetune", default="channels:0.3,heads:0.3", help="SmolLM2 outputs to fine-tune, PATTERN:RATIO,...")
    p.add_argument("--ft-steps", type=int, default=30)
    p.add_argument("--big-only", action="store_true", help="only the 1B-shaped model")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity and fine-tuning")
    p.add_argument("--reuse", action="store_true", help="reuse pruned outputs already in --work")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="time forward passes in process CPU seconds on one thread (default) or wall seconds")
    p.add_argument("--json", default="eval/structured.json")
    args = p.parse_args()
    from llmprune.packaged import smollm2_checkpoint

    if args.clock == "cpu":
        torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict] = []
    report = {"command": shlex.join(["python", *sys.argv]), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "rows": rows, "perplexity": None}

    def save() -> None:  # after every stage, so a cut-short run keeps what it measured
        report["seconds"] = round(time.perf_counter() - start)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    if not args.big_only:
        smol = smollm2_checkpoint()
        measure_model("smollm2", smol, work, args, rows)
        save()
        if not args.no_ppl:
            report["perplexity"] = perplexities(rows, smol, work, args)
            save()
    if args.big_layers:
        measure_model("llama-1b-shape", big_model(work / "llama-1b-shape", args.big_layers), work, args, rows)
        save()
    print(table(rows, report["perplexity"]))
    print(f"total {report['seconds']} s")


if __name__ == "__main__":
    main()
