"""What a smaller dense model buys, side by side with its dense input, in one run.

For the dense checkpoint and each pruned output folder: parameters and safetensors bytes (from
the files), then, in a fresh subprocess per model and repetition that imports only torch and
transformers (it asserts that ``llmprune`` is not in ``sys.modules``): peak RSS to load the model,
prefill and decode tokens/s with plain ``generate`` at batch 1 and 8, and a greedy generation of a
short text. Repetitions interleave the models (dense, A, B, dense, A, B, ...) so that a change of
load on a shared machine falls on all of them; medians and ratios to dense are reported.

    python scripts/bench_payoff.py --model channels=/tmp/out/channels --model layers=/tmp/out/layers \\
        --json eval/payoff.json --md eval/payoff.md

Prefill: ``generate`` of one new token from a PROMPT-token prompt, tokens/s = batch x PROMPT / time.
Decode: ``generate`` of NEW tokens (``min_new_tokens`` = NEW, greedy) from the same prompt; tokens/s
= batch x (NEW - 1) / (time - prefill time), the steps after the first. Prompt ids are fixed
pseudo-random ids (seed 0), the same for every model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

GREEDY_PROMPT = "The State of the Union is"


# --------------------------------------------------------------------------------------------
# Worker: one model, one repetition, in its own process (no llmprune import)
# --------------------------------------------------------------------------------------------

def worker(folder: str, threads: int, prompt: int, new: int, batches: list[int]) -> dict:
    import resource

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    out: dict = {"rss_before_load_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out["load_s"] = time.perf_counter() - start
    out["peak_rss_after_load_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_rss_mib"] = out["peak_rss_after_load_mib"] - out["rss_before_load_mib"]
    out["params_in_memory"] = sum(p.numel() for p in model.parameters())
    out["transformers"], out["torch"] = transformers.__version__, torch.__version__
    out["attn_implementation"] = model.config._attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab, (max(batches), prompt), generator=torch.Generator().manual_seed(0))

    def generate(batch: int, steps: int) -> tuple[float, float]:
        """Wall and process CPU seconds (all threads) of one greedy generate."""
        x = ids[:batch]
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, min_new_tokens=steps,
                               do_sample=False, pad_token_id=pad)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert y.shape == (batch, prompt + steps), y.shape
        return seconds, cpu

    with torch.inference_mode():
        model(ids[:1, :1])  # touches every weight (from_pretrained may map the file lazily)
    out["peak_rss_after_first_forward_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["weights_rss_mib"] = out["peak_rss_after_first_forward_mib"] - out["rss_before_load_mib"]
    generate(1, 2)  # warm-up (first-call allocations)
    for batch in batches:
        prefill, prefill_cpu = generate(batch, 1)
        total, total_cpu = generate(batch, new)
        out[f"b{batch}"] = {"prefill_s": prefill, "generate_s": total, "prefill_cpu_s": prefill_cpu,
                            "generate_cpu_s": total_cpu,
                            "prefill_tok_s": batch * prompt / prefill,
                            "decode_tok_s": batch * (new - 1) / max(total - prefill, 1e-9),
                            "prefill_tok_per_cpu_s": batch * prompt / prefill_cpu,
                            "decode_tok_per_cpu_s": batch * (new - 1) / max(total_cpu - prefill_cpu, 1e-9)}
    out["peak_rss_end_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    enc = tokenizer(GREEDY_PROMPT, return_tensors="pt")
    with torch.inference_mode():
        y = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=pad)
    text = tokenizer.decode(y[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    out["greedy"] = {"prompt": GREEDY_PROMPT, "new_tokens": int(y.shape[1] - enc["input_ids"].shape[1]), "text": text}
    out["llmprune_imported"] = "llmprune" in sys.modules
    assert not out["llmprune_imported"], "the worker must run on plain transformers"
    out["loadavg"] = os.getloadavg()
    return out


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def file_facts(folder: Path) -> dict:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder}: no safetensors files")
    params = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            params += sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())
    config = json.loads((folder / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {"folder": str(folder), "params": params, "safetensors_bytes": sum(p.stat().st_size for p in files),
            "config": {k: config.get(k) for k in keys}}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_worker(folder: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", folder, "--threads", str(args.threads),
           "--prompt", str(args.prompt), "--new", str(args.new), "--batches", args.batches]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    if done.returncode != 0:
        raise SystemExit(f"worker on {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(rows: list[dict], *path: str) -> float:
    values = []
    for row in rows:
        for key in path:
            row = row[key]
        values.append(row)
    return statistics.median(values)


def metrics(batches: list[int]) -> list[tuple[str, ...]]:
    return [("load_rss_mib",), ("weights_rss_mib",), ("peak_rss_end_mib",),
            *((f"b{b}", k) for b in batches for k in ("prefill_tok_s", "decode_tok_s")),
            *((f"b{b}", k) for b in batches for k in ("prefill_tok_per_cpu_s", "decode_tok_per_cpu_s"))]


def markdown(report: dict) -> str:
    names = list(report["models"])
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    lines = []
    for key, label in (("params", "parameters"), ("safetensors_bytes", "safetensors bytes")):
        lines.append(f"| {label} | " + " | ".join(
            f"{report['models'][n][key]:,} ({report['models'][n][key] / report['models']['dense'][key]:.3f})"
            for n in names) + " |")
    for path in metrics(report["protocol"]["batches"]):
        label = " ".join(path).replace("_", " ")
        cells = []
        for n in names:
            m = report["models"][n]["median"]["/".join(path)]
            r = report["models"][n]["ratio_to_dense"]["/".join(path)]
            cells.append(f"{m:,.1f} ({r:.2f}x)")
        lines.append(f"| {label} (median) | " + " | ".join(cells) + " |")
    lines.append("| greedy generation, no llmprune import | " + " | ".join(
        f"{report['models'][n]['greedy']['new_tokens']} tokens: {report['models'][n]['greedy']['text']!r}"
        for n in names) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", help="dense checkpoint folder (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER", help="a pruned output, repeatable")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens for decode")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--json", default="eval/payoff.json")
    p.add_argument("--md", help="also write the table as markdown here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.prompt, args.new, batches)))
        return

    if args.dense is None:
        from llmprune.packaged import smollm2_checkpoint  # only to find the packaged folder; workers never import it

        args.dense = str(smollm2_checkpoint())
    models = {"dense": args.dense}
    for item in args.model:
        name, _, folder = item.partition("=")
        if not folder or name in models:
            raise SystemExit(f"--model {item}: expected a new NAME=FOLDER")
        models[name] = folder
    report: dict = {"command": shlex.join(["python", "scripts/bench_payoff.py", *(argv or sys.argv[1:])]),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads, float32",
                    "protocol": {"prompt_tokens": args.prompt, "new_tokens": args.new, "batches": batches, "reps": args.reps,
                                 "order": "interleaved: " + ", ".join(models) + ", repeated",
                                 "prefill": "generate 1 new token; batch x prompt / seconds",
                                 "decode": "generate NEW tokens (min_new_tokens=NEW, greedy); batch x (NEW-1) / (seconds - prefill seconds)",
                                 "load_rss": "ru_maxrss after from_pretrained minus before it, fresh process per model and rep",
                                 "weights_rss": "ru_maxrss after a 1-token forward (every weight touched) minus before from_pretrained",
                                 "per_cpu_s": "tokens per second of process CPU time (all threads): less sensitive to other jobs than wall time"},
                    "uptime_before": uptime(), "models": {n: file_facts(Path(f)) for n, f in models.items()}, "runs": []}
    print(report["uptime_before"], flush=True)
    for rep in range(args.reps):
        for name, folder in models.items():
            row = run_worker(folder, args)
            row.update(model=name, rep=rep)
            report["runs"].append(row)
            print(json.dumps({"model": name, "rep": rep, **{"/".join(k): round(median([row], *k), 1) for k in metrics(batches)},
                              "loadavg": row["loadavg"]}), flush=True)
    report["uptime_after"] = uptime()
    print(report["uptime_after"], flush=True)
    for name, facts in report["models"].items():
        rows = [r for r in report["runs"] if r["model"] == name]
        facts["median"] = {"/".join(k): median(rows, *k) for k in metrics(batches)}
        facts["params_in_memory"] = rows[0]["params_in_memory"]
        facts["greedy"] = rows[0]["greedy"]
        facts["greedy_identical_across_reps"] = all(r["greedy"] == rows[0]["greedy"] for r in rows)
        facts["llmprune_imported_in_worker"] = any(r["llmprune_imported"] for r in rows)
    for name, facts in report["models"].items():
        facts["ratio_to_dense"] = {k: v / report["models"]["dense"]["median"][k] for k, v in facts["median"].items()}
    report["versions"] = {"torch": report["runs"][0]["torch"], "transformers": report["runs"][0]["transformers"]}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    print(table)
    if args.md:
        Path(args.md).write_text(table)


if __name__ == "__main__":
    main()
