"""Perplexity of W8A8 exports over a grid of SmoothQuant settings, to choose the defaults by measurement.

    python scripts/sweep_smoothing.py MODEL --calib-text train.txt --eval-texts valid.txt,wiki.txt \
        --alphas 0.3,0.5,0.7 --w-stats lmdeploy,absmax

Calibrates once, then for each (alpha, w_stat) folds the factors into a copy of the model, quantizes
it in memory and scores each evaluation text as `lite eval` does. `alpha none` is plain round-to-nearest.
"""

import argparse
import copy

import torch

from lite.steps.stats import collect_statistics
from lite.data import calibration_tokens, load_text
from lite.eval import eval_windows, perplexity
from lite.export import quantize_model_
from lite.model import decoder_blocks, load_model
from lite.smooth import migration_scales


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--calib-text", required=True)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--eval-texts", required=True, help="comma-separated files or dataset names")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--alphas", default="none,0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--w-stats", default="lmdeploy,absmax")
    p.add_argument("--quant-dtype", default="int8")
    args = p.parse_args()

    loaded = load_model(args.model)
    tokens = calibration_tokens(loaded.tokenizer, args.calib_text, args.calib_samples, args.calib_seqlen, 0)
    stats, _ = collect_statistics(loaded.model, loaded.arch, tokens, 8, "cpu", progress=False)
    texts = {name: eval_windows(loaded.tokenizer, load_text(name, eval_split=True), args.seqlen)[0]
             for name in args.eval_texts.split(",")}
    base = {name: perplexity(loaded.model, w, progress=False) for name, w in texts.items()}
    print("alpha  w_stat    " + "  ".join(f"{name.split('/')[-1]:>28}" for name in texts))
    print("fp32   -         " + "  ".join(f"{base[n]:>28.4f}" for n in texts))
    for alpha in args.alphas.split(","):
        for w_stat in (["-"] if alpha == "none" else args.w_stats.split(",")):
            model = copy.deepcopy(loaded.model)
            scales = None
            if alpha != "none":
                scales = migration_scales(decoder_blocks(model, loaded.arch), loaded.arch, model.config,
                                          stats["absmax"], float(alpha), w_stat)
            quantize_model_(model, args.quant_dtype, scales, False, progress=False)
            cells = []
            for name, w in texts.items():
                ppl = perplexity(model, w, progress=False)
                cells.append(f"{ppl:>12.4f} ({100 * (ppl / base[name] - 1):+7.3f} %)")
            print(f"{alpha:<6} {w_stat:<9} " + "  ".join(f"{c:>28}" for c in cells), flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
