"""Perplexity of compressed-tensors schemes over alpha, weight statistic and observer, in memory.

Loads the model and calibrates once, then for each setting quantizes a copy exactly as
`lite smooth_quant --format compressed-tensors` does and prints its perplexity relative to the float
model. Used to choose the defaults recorded in docs/compressed-tensors.md; confirm a choice with
`lite smooth_quant` + `lite eval`.

    python scripts/sweep_ct.py MODEL --calib-text train.txt --eval-text valid.txt \
        --settings "int8:dynamic:minmax:none:lmdeploy,int8:static:mse:0.5:lmdeploy"

A setting is quant_dtype:act_scheme:act_observer[@percentile]:alpha|none:w_stat.
"""

import argparse
import copy
import json
import time

import torch

from lite import compressed_tensors
from lite.steps.stats import collect_statistics
from lite.data import calibration_tokens
from lite.eval import eval_windows, perplexity
from lite.model import decoder_blocks, load_model
from lite.observers import ActSettings
from lite.smooth import migration_scales


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--calib-text", required=True)
    p.add_argument("--eval-text", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--samples", type=int, default=None, help="evaluate on at most this many windows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json-out")
    args = p.parse_args()

    loaded = load_model(args.model)
    tokens = calibration_tokens(loaded.tokenizer, args.calib_text, args.calib_samples, args.calib_seqlen, 0)
    inputs, _ = collect_statistics(loaded.model, loaded.arch, tokens, 4, args.device, progress=False)
    with open(args.eval_text) as f:
        windows, _ = eval_windows(loaded.tokenizer, f.read(), args.seqlen, args.samples)
    base = perplexity(copy.deepcopy(loaded.model).to(args.device), windows, 32, args.device, progress=False)
    print(f"float perplexity {base:.4f} on {windows.shape[0]} windows")
    rows = []
    for setting in args.settings.split(","):
        quant_dtype, scheme, observer, alpha, w_stat = setting.split(":")
        observer, _, pct = observer.partition("@")
        act = ActSettings(scheme, observer, float(pct or 99.99))
        model = copy.deepcopy(loaded.model)
        scales = None
        if alpha != "none":
            scales = migration_scales(decoder_blocks(model, loaded.arch), loaded.arch, model.config,
                                      inputs["absmax"], float(alpha), w_stat)
        t = time.time()
        compressed_tensors.quantize_model_(model, quant_dtype, scales, act, tokens, 4, args.device, progress=False)
        ppl = perplexity(model.to(args.device), windows, 32, args.device, progress=False)
        change = 100 * (ppl / base - 1)
        rows.append({"setting": setting, "perplexity": ppl, "relative_change_pct": change})
        print(f"{setting:<45} {ppl:.4f} {change:+.3f}%  ({time.time() - t:.1f}s)", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"float": base, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
