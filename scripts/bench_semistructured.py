"""Do 2:4 zeros pay off at run time? Semi-structured sparse kernels against dense, on one GPU.

For LLaMA-shaped linears (7B and 70B shapes) pruned 2:4 by llmprune's own mask code, converts each
weight with ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt when torch has it, else CUTLASS)
and times ``x @ W.T`` against the dense weight, then does the same for a whole Llama decoder layer
(every linear swapped) on a (1, seqlen, hidden) input. Prints one JSON line per measurement with
the speed-up (dense seconds / sparse seconds, > 1 means the sparse kernel is faster) and the largest
deviation of the sparse result from the dense one. GPU only (needs CUDA, fp16/bf16, sm_80+).

    python3 scripts/bench_semistructured.py [--dtype float16] [--tokens 2048,128] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.masks import apply, n_m

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
}


def prune_2of4(weight: torch.Tensor) -> torch.Tensor:
    """The weight with 2 of every 4 consecutive input weights zeroed by magnitude (llmprune's masks)."""
    return apply(weight, n_m(weight.abs().float(), 2, 4))


def timed(fn, repeats: int) -> float:
    """Median seconds of one call, after warm-up, timed with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def linear_rows(shapes: dict, name: str, dtype: torch.dtype, tokens: list[int], repeats: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    h, i = shapes["hidden_size"], shapes["intermediate_size"]
    kv = h // shapes["num_attention_heads"] * shapes["num_key_value_heads"]
    rows = []
    for proj, (out_f, in_f) in {"q_proj": (h, h), "k_proj": (kv, h), "gate_proj": (i, h), "down_proj": (h, i)}.items():
        w = prune_2of4(torch.randn(out_f, in_f, device="cuda", dtype=dtype) * 0.02)
        ws = to_sparse_semi_structured(w)
        for t in tokens:
            x = torch.randn(t, in_f, device="cuda", dtype=dtype)
            dense = timed(lambda: F.linear(x, w), repeats)
            sparse = timed(lambda: F.linear(x, ws), repeats)
            err = (F.linear(x, ws) - F.linear(x, w)).abs().max().item()
            rows.append({"what": "linear", "model": name, "proj": proj, "shape": [out_f, in_f], "tokens": t,
                         "dense_ms": round(dense * 1e3, 4), "sparse_ms": round(sparse * 1e3, 4),
                         "speedup": round(dense / sparse, 3), "max_abs_diff": err})
    return rows


def layer_row(shapes: dict, name: str, dtype: torch.dtype, seqlen: int, repeats: int) -> dict:
    from torch.sparse import to_sparse_semi_structured
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = AutoConfig.for_model("llama", num_hidden_layers=1, max_position_embeddings=seqlen, **shapes)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).to("cuda", dtype).eval()
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(prune_2of4(module.weight.data * 0.02 / module.weight.data.std()),
                                         requires_grad=False)
    x = torch.randn(1, seqlen, shapes["hidden_size"], device="cuda", dtype=dtype)
    pos = LlamaRotaryEmbedding(config).to("cuda")(x, torch.arange(seqlen, device="cuda")[None])

    def forward():
        with torch.inference_mode():
            out = layer(x, position_embeddings=pos, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    dense_out, dense = forward(), timed(forward, repeats)
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.data), requires_grad=False)
    sparse_out, sparse = forward(), timed(forward, repeats)
    return {"what": "decoder layer forward", "model": name, "seqlen": seqlen, "dense_ms": round(dense * 1e3, 3),
            "sparse_ms": round(sparse * 1e3, 3), "speedup": round(dense / sparse, 3),
            "max_abs_diff": (sparse_out - dense_out).abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--tokens", default="2048,128", help="rows of x for the linear timings")
    ap.add_argument("--seqlen", type=int, default=2048, help="tokens for the decoder-layer forward")
    ap.add_argument("--models", default="7b,70b")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_semistructured: needs a CUDA GPU (semi-structured sparse kernels are GPU only)")
    dtype = getattr(torch, args.dtype)
    backend = "cuSPARSELt" if torch.backends.cusparselt.is_available() else "CUTLASS"
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
                      "backend": backend}), flush=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    for name in args.models.split(","):
        for row in linear_rows(SHAPES[name], name, dtype, tokens, args.repeats):
            print(json.dumps(row), flush=True)
        print(json.dumps(layer_row(SHAPES[name], name, dtype, args.seqlen, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
