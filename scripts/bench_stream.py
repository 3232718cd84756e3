"""Streaming throughput and peak memory of magnitude pruning, against a plain file copy.

Builds a synthetic 1.1B-parameter bf16 checkpoint (TinyLlama shapes: 22 layers, hidden 2048,
intermediate 5632, 32 heads, 4 KV heads) and the same with twice the layers, tensor by tensor so
that building it needs no memory either. Then, alternating, several times:
  copy   - the checkpoint's files copied with shutil.copyfile and fsynced: reading and writing
           every byte once, which no streaming pass can beat;
  prune  - `llmprune DIR --sparsity 0.5` in a fresh process (its llmprune.json records peak RSS).
Prints the best time of each, the throughput ratio prune/copy, and peak RSS at 1x and 2x layers.

    python scripts/bench_stream.py [--workdir /tmp/llmprune-bench] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from llmprune.arch import build_skeleton
from llmprune.checkpoint import TensorSpec
from llmprune.shards import ShardWriter

SHAPES = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
              vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def build(folder: Path, layers: int) -> Path:
    """A random bf16 Llama checkpoint written one tensor at a time."""
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("llama", num_hidden_layers=layers, dtype="bfloat16", **SHAPES)
    skeleton = build_skeleton(config)
    specs = [TensorSpec(n, torch.bfloat16, tuple(p.shape)) for n, p in skeleton.state_dict().items()
             if not n.endswith("rotary_emb.inv_freq")]
    writer = ShardWriter(folder, specs, 2 * 10**9)
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        writer.write(spec.name, (torch.randn(spec.shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(folder)
    return folder


def copy_once(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    start = time.perf_counter()
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, dst / f.name)
        fd = os.open(dst / f.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - start


def prune_once(src: Path, dst: Path) -> tuple[float, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmprune.cli", str(src), "--sparsity", "0.5", "-o", str(dst),
                    "--overwrite", "-q", "--device", "cpu"], check=True)
    wall = time.perf_counter() - start
    return wall, json.loads((dst / "llmprune.json").read_text())["peak_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/llmprune-bench")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    for layers in (22, 44):
        src = build(work / f"llama-{layers}L", layers)
        size = sum(f.stat().st_size for f in src.iterdir())
        copies, prunes, rss = [], [], []
        for _ in range(args.repeats):
            copies.append(copy_once(src, work / "copy"))
            wall, peak = prune_once(src, work / "pruned")
            prunes.append(wall)
            rss.append(peak)
        shutil.rmtree(work / "copy", ignore_errors=True)
        rows.append((layers, size, min(copies), min(prunes), max(rss)))
    print(f"{'layers':>6} {'GB':>6} {'copy s':>7} {'prune s':>8} {'copy GB/s':>9} {'prune GB/s':>10} "
          f"{'ratio':>6} {'peak RSS MB':>11}")
    for layers, size, c, p, r in rows:
        print(f"{layers:>6} {size / 1e9:>6.2f} {c:>7.2f} {p:>8.2f} {size / c / 1e9:>9.2f} {size / p / 1e9:>10.2f} "
              f"{c / p:>6.2f} {r:>11.0f}")
    print(f"peak RSS 2x layers / 1x layers: {rows[1][4] / rows[0][4]:.2f}")


if __name__ == "__main__":
    main()
