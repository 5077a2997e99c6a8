"""Time the `statistics` observers' per-channel reduction on CUDA: `lite.kernels.column_stats` (one read)
against `column_stats_reference` (torch, three reads), on the activations of a Llama-3-8B block at a
batch of `--tokens` tokens, and check that they agree (min and max exactly, sums to fp32 rounding).

    python scripts/bench_column_stats.py --tokens 8192
"""

import argparse
import sys
import os
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lite.kernels import column_stats, column_stats_reference  # noqa: E402


def timed(fn, x, repeats):
    fn(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--tiles", action="store_true", help="also try other tilings (tokens per step, channels per "
                   "program, programs per SM, warps) and print the best")
    args = p.parse_args()
    if args.tiles:
        try_tiles(args)
    # Observed widths in one Llama-3-8B block: norm outputs (2 x 4096), q 4096, k 1024, v 1024, o in/out
    # (2 x 4096), gate and up outputs (2 x 14336), down in 14336 and out 4096.
    widths = [4096, 4096, 4096, 1024, 1024, 4096, 4096, 14336, 14336, 14336, 4096]
    total_ref = total_fast = 0.0
    for c in sorted(set(widths)):
        x = torch.randn(args.tokens, c, device="cuda", dtype=torch.bfloat16)
        ref, fast = column_stats_reference(x), column_stats(x)
        assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])
        for a, b in zip(ref[2:], fast[2:]):
            assert ((a - b).abs() <= 1e-5 * x.float().abs().sum(0) + 1e-6).all()
        t_ref, t_fast = timed(column_stats_reference, x, args.repeats), timed(column_stats, x, args.repeats)
        gb = x.numel() * x.element_size() / 1e9
        print(f"{args.tokens} x {c:5d}: reference {t_ref * 1e3:7.3f} ms, column_stats {t_fast * 1e3:7.3f} ms "
              f"({gb / t_fast:.0f} GB/s)")
        n = widths.count(c)
        total_ref, total_fast = total_ref + n * t_ref, total_fast + n * t_fast
    print(f"one block, one batch of {args.tokens} tokens: reference {total_ref * 1e3:.2f} ms, "
          f"column_stats {total_fast * 1e3:.2f} ms")


def try_tiles(args):
    import itertools

    xs = [torch.randn(args.tokens, c, device="cuda", dtype=torch.bfloat16) for c in (1024, 4096, 14336)]
    results = []
    for tile in itertools.product((16, 32, 64, 128), (64, 128, 256), (2, 4, 8, 16), (4, 8)):
        if tile[0] * tile[1] > 16384:
            continue
        try:
            t = sum(timed(lambda x: column_stats(x, tile), x, 10) * n for x, n in zip(xs, (2, 7, 3)))
        except Exception as e:  # a tiling Triton cannot compile
            print(tile, type(e).__name__)
            continue
        results.append((t, tile))
    for t, tile in sorted(results)[:8]:
        print(f"tile {tile}: {t * 1e3:.3f} ms per block and batch")


if __name__ == "__main__":
    main()
