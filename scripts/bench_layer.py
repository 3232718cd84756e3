"""Seconds and peak memory to prune ONE decoder layer with calibration, at chosen shapes.

Builds a random Llama decoder layer (default: LLaMA-2-70B shapes: hidden 8192, intermediate
28672, 64 heads, 8 KV heads) in bf16 on the device, random calibration states
(nsamples x seqlen x hidden, default 128 x 2048), and runs llmprune's own calibrated step on it:
statistics hooks, the criterion on every linear, propagation to the next layer's inputs.
Prints one JSON line per method with seconds and peak memory (GPU allocator peak on CUDA, process
peak RSS otherwise). Meant for a lent GPU; `--small` runs 1/16-wide shapes on a CPU.

    python scripts/bench_layer.py --methods wanda,sparsegpt [--small] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from transformers import AutoConfig

from llmprune import criteria
from llmprune.arch import layout_of
from llmprune.steps import CalibratedPruneStep
from llmprune.devices import resolve_device
from llmprune.masks import Pattern
from llmprune.stream import Activations, Layer

SHAPES_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
SHAPES_SMALL = dict(hidden_size=512, intermediate_size=1792, num_attention_heads=16, num_key_value_heads=2)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--small", action="store_true", help="hidden and intermediate / 16 (CPU smoke run)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    shapes = SHAPES_SMALL if args.small else SHAPES_70B
    config = AutoConfig.for_model("llama", num_hidden_layers=1, vocab_size=256, max_position_embeddings=args.seqlen,
                                  dtype="bfloat16", **shapes)
    layout = layout_of(config)
    gen = torch.Generator().manual_seed(0)
    meta = layout.layer_module(0)
    state = {n: (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16) for n, p in meta.state_dict().items()}

    for method in args.methods.split(","):
        tensors = {f"model.layers.0.{n}": t.to(device) for n, t in state.items()}
        ids = torch.randint(0, 256, (args.nsamples, args.seqlen), generator=gen)
        # Real embeddings of random ids give the layer realistic argument shapes (mask, rotary).
        from llmprune.arch import ModelWithoutLayers

        embed = {"model.embed_tokens.weight": torch.randn(256, shapes["hidden_size"], generator=gen).to(torch.bfloat16),
                 "model.norm.weight": torch.ones(shapes["hidden_size"], dtype=torch.bfloat16),
                 "lm_head.weight": torch.randn(256, shapes["hidden_size"], generator=gen).to(torch.bfloat16)}
        outer = ModelWithoutLayers(layout, embed.__getitem__, device)
        store = device if device.type == "cuda" else torch.device("cpu")
        acts = Activations(outer, ids, 8, store)
        targets = {name: 0.5 for _, name in layout.linear_names(0)}
        step = CalibratedPruneStep(criteria.get(method), targets, Pattern.parse(args.pattern), "l1", acts)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step(Layer(0, tensors, layout))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print(json.dumps({"method": method, "pattern": args.pattern, "device": str(device),
                          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                          "shapes": shapes, "calibration": [args.nsamples, args.seqlen],
                          "seconds_per_layer": round(seconds, 2), "peak_memory_gb": round(peak / 1e9, 2),
                          "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"}),
              flush=True)
        del tensors, acts, step, outer


if __name__ == "__main__":
    main()
