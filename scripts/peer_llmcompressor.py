"""Prune a checkpoint with llm-compressor, the peer that llmprune is benchmarked against.

Runs inside .venv-peer (made by scripts/peer_env.sh), never in the project venv: it must
not import llmprune. Both tools calibrate on the same token ids, saved by our side as a
LongTensor of shape (nsamples, seqlen) with torch.save.

    .venv-peer/bin/python scripts/peer_llmcompressor.py --model DIR --method wanda \
        --pattern 2:4 --sparsity 0.5 --calib calib.pt --output OUT

Only the oneshot call is timed. The output is a plain dense safetensors checkpoint that
the project venv loads with AutoModelForCausalLM.from_pretrained. The last stdout line is
one JSON object: tool, version, method, pattern, seconds, sparsity (zeros measured over
the decoder layers' linear weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

# The Hub is out of reach here; fail fast instead of retrying connections.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import llmcompressor  # noqa: E402
import torch  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, set_seed  # noqa: E402

log = logging.getLogger("peer_llmcompressor")

MASK_STRUCTURE = {"unstructured": "0:0", "2:4": "2:4"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF checkpoint folder")
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    p.add_argument("--pattern", required=True, choices=sorted(MASK_STRUCTURE))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--calib", required=True, help="torch.save'd LongTensor (nsamples, seqlen)")
    p.add_argument("--output", required=True, help="folder for the pruned dense checkpoint")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def decoder_layer_class(model: PreTrainedModel) -> str:
    """The decoder layer class name, from the model itself (e.g. LlamaDecoderLayer)."""
    names = list(model._no_split_modules or [])
    if len(names) != 1:
        raise SystemExit(f"expected one decoder layer class in _no_split_modules, got {names}")
    return names[0]


def calibration_dataset(path: str) -> datasets.Dataset:
    ids = torch.load(path)
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
        raise SystemExit(f"{path}: expected an integer tensor (nsamples, seqlen), got {type(ids)}")
    ids = ids.long()
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )


def make_modifier(method: str, pattern: str, sparsity: float, layer_cls: str):
    # Targets are the decoder layers: every Linear inside them is pruned, so lm_head
    # (tied to the embeddings in SmolLM2) and the embeddings are left alone, as in llmprune.
    common = dict(
        sparsity=sparsity,
        mask_structure=MASK_STRUCTURE[pattern],
        targets=[layer_cls],
        ignore=["re:.*lm_head"],
    )
    if method == "wanda":
        return WandaPruningModifier(**common)
    return SparseGPTModifier(**common, dampening_frac=0.01, block_size=128)


def linear_sparsity(model: PreTrainedModel, layer_cls: str) -> float:
    zeros = total = 0
    for module in model.modules():
        if type(module).__name__ != layer_cls:
            continue
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                zeros += int((sub.weight == 0).sum())
                total += sub.weight.numel()
    return zeros / total


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ds = calibration_dataset(args.calib)
    nsamples, seqlen = len(ds), len(ds[0]["input_ids"])
    layer_cls = decoder_layer_class(model)
    modifier = make_modifier(args.method, args.pattern, args.sparsity, layer_cls)
    log.info("llmcompressor %s: %s on %d x %d tokens", llmcompressor.__version__, modifier, nsamples, seqlen)

    start = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=ds,
        recipe=modifier,
        pipeline="sequential",
        sequential_targets=[layer_cls],
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=1,
        output_dir=None,  # saved below, outside the timing
    )
    seconds = time.perf_counter() - start

    # oneshot replaces model.save_pretrained with a compressed-tensors wrapper that adds a
    # quantization_config to config.json (loading it would then need compressed-tensors).
    # The class's own method writes a plain dense checkpoint.
    type(model).save_pretrained(model, args.output)
    tokenizer.save_pretrained(args.output)

    result = {
        "tool": "llmcompressor",
        "version": llmcompressor.__version__,
        "method": args.method,
        "pattern": args.pattern,
        "seconds": round(seconds, 3),
        "sparsity": round(linear_sparsity(model, layer_cls), 6),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
