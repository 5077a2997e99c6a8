"""Time `--alpha auto` against calibration alone on one model (CPU or GPU).

    python scripts/bench_alpha_search.py ../shared/models/stories260K-hf --calib-text ../shared/text/tinystories-train.txt \\
        --quant-dtype fp8 --device cpu
"""

import argparse
import time

import torch

from lite.calibrate import collect_statistics
from lite.data import calibration_tokens
from lite.model import load_model
from lite.search import search_alphas


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--calib-text", default="sample")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--quant-dtype", default="fp8")
    p.add_argument("--w-stat", default="lmdeploy")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    loaded = load_model(args.model)
    tokens = calibration_tokens(loaded.tokenizer, args.calib_text, args.calib_samples, args.calib_seqlen, 0)
    start = time.perf_counter()
    inputs, _ = collect_statistics(loaded.model, loaded.arch, tokens, args.batch_size, args.device, progress=False)
    calibration = time.perf_counter() - start
    start = time.perf_counter()
    _, chosen = search_alphas(loaded.model, loaded.arch, inputs["absmax"], args.w_stat, args.quant_dtype, tokens,
                              args.batch_size, args.device, progress=False)
    search = time.perf_counter() - start
    print(f"{len(chosen)} blocks, {tokens.numel()} calibration tokens on {args.device}: "
          f"calibration {calibration:.1f} s, alpha search {search:.1f} s")
    print("chosen: " + ", ".join(f"{prefix}: {alpha}" for prefix, alpha in chosen.items()))


if __name__ == "__main__":
    main()
