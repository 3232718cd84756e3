"""Dense vs sparse-bitmask saves of a real model: bytes on disk, and every load path checked bit for bit.

Prunes the packaged SmolLM2-135M-Instruct (or --model) in bf16 with each pattern, once per save
format, then loads the sparse save through each path (from_pretrained after `import llmprune`,
llmprune.load, llmprune decompress) and compares every tensor with the dense save's.

    python scripts/bench_save.py --json eval/save_formats.json --markdown eval/save_formats.md
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llmprune  # noqa: E402
from llmprune.cli import main as cli  # noqa: E402


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same_bits(a: dict, b: dict) -> bool:
    def raw(t):
        return t.contiguous().view(torch.uint8)
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(raw(a[k]), raw(b[k])) for k in a)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 2)


def run_pattern(model: str, pattern: str, root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    args = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
    row: dict = {"pattern": pattern}
    for fmt in ("dense", "sparse-bitmask"):
        out = root / f"{pattern.replace(':', 'of')}-{fmt}"
        code, row[f"{fmt}_prune_s"] = timed(lambda: cli([model, *args, "--dtype", "bfloat16", "--save-format", fmt,
                                                         "-o", str(out), "-q"]))
        assert code == 0, f"prune failed for {fmt}"
        row[f"{fmt}_bytes"] = weights_bytes(out)
    dense, packed = root / f"{pattern.replace(':', 'of')}-dense", root / f"{pattern.replace(':', 'of')}-sparse-bitmask"
    row["ratio"] = round(row["sparse-bitmask_bytes"] / row["dense_bytes"], 4)
    reference, row["dense_from_pretrained_s"] = timed(lambda: AutoModelForCausalLM.from_pretrained(dense).state_dict())
    loaded, row["sparse_from_pretrained_s"] = timed(lambda: AutoModelForCausalLM.from_pretrained(packed).state_dict())
    row["from_pretrained_bit_identical"] = same_bits(loaded, reference)
    loaded, row["llmprune_load_s"] = timed(lambda: llmprune.load(packed).state_dict())
    row["llmprune_load_bit_identical"] = same_bits(loaded, reference)
    back = root / f"{pattern.replace(':', 'of')}-decompressed"
    code, row["decompress_s"] = timed(lambda: cli(["decompress", str(packed), str(back), "-q"]))
    row["decompress_bit_identical"] = code == 0 and same_bits(tensors(back), tensors(dense))
    print(json.dumps(row), flush=True)
    return row


def markdown(result: dict) -> str:
    lines = [f"Command: `{result['command']}` ({result['machine']}).", "",
             f"Model: {result['model']}, bf16. Bytes are the safetensors files.", "",
             "| pattern | dense MB | sparse-bitmask MB | ratio | from_pretrained | llmprune.load | decompress |",
             "|---|---:|---:|---:|---|---|---|"]
    for r in result["rows"]:
        ok = {True: "bit-identical", False: "DIFFERS"}
        lines.append(f"| {r['pattern']} | {r['dense_bytes'] / 1e6:.1f} | {r['sparse-bitmask_bytes'] / 1e6:.1f} | "
                     f"{r['ratio']:.3f} | {ok[r['from_pretrained_bit_identical']]} | "
                     f"{ok[r['llmprune_load_bit_identical']]} | {ok[r['decompress_bit_identical']]} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="packaged:smollm2")
    p.add_argument("--patterns", default="0.5,2:4", help="sparsities and N:M patterns, comma-separated")
    p.add_argument("--machine", default="unnamed machine", help="what ran it, for the record")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmprune-save-") as tmp:
        rows = [run_pattern(args.model, pattern, Path(tmp)) for pattern in args.patterns.split(",")]
    result = {"command": shlex.join(["python", "scripts/bench_save.py", *sys.argv[1:]]), "machine": args.machine,
              "model": args.model, "torch": torch.__version__, "python": platform.python_version(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
