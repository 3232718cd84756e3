"""SparseGPT's triangular inverse, side by side: one solve against I (n^3 flops) vs the blocked
inverse of `llmprune.criteria.sparsegpt.lower_inverse` (n^3 / 3), on the same Cholesky factor.

    python scripts/bench_factor.py 12288        # n; best of --repeats alternating runs each
"""

from __future__ import annotations

import argparse
import time

import torch

from llmprune.criteria import sparsegpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n = args.n
    torch.manual_seed(0)
    a = torch.randn(n, n) / n**0.5
    h = a @ a.T
    h.diagonal().add_(1.0)
    lower = torch.linalg.cholesky(h).mT.contiguous().mT  # column-major, as the criterion factors it
    del a, h
    leaf = sparsegpt.INVERSE_LEAF
    times: dict[str, list[float]] = {"solve against I": [], "blocked": []}
    for _ in range(args.repeats):
        for label, size in (("solve against I", n), ("blocked", leaf)):
            sparsegpt.INVERSE_LEAF = size
            start = time.perf_counter()
            x = sparsegpt.lower_inverse(lower)
            times[label].append(time.perf_counter() - start)
            rows = min(n, 512)
            residual = float((lower[:rows] @ x[:, :rows] - torch.eye(rows)).abs().max())
            print(f"{label}: {times[label][-1]:.2f} s, max |L X - I| on the first {rows} columns {residual:.2g}",
                  flush=True)
            del x
    best = {k: min(v) for k, v in times.items()}
    print(f"n={n}: solve against I {best['solve against I']:.2f} s, blocked {best['blocked']:.2f} s, "
          f"ratio {best['solve against I'] / best['blocked']:.2f}x")


if __name__ == "__main__":
    main()
