"""KL from the float model of int8 W8A8 with static per-tensor activation scales (compressed-tensors),
with and without `[fuse_norms, rotate]` before SmoothQuant (issue 9).

    python scripts/compare_rotation.py ../shared/models/stories260K-hf --calib-text ../shared/text/tinystories-train.txt \\
        --eval-texts ../shared/text/tinystories-valid.txt,../shared/text/wikitext-2-raw-test.txt --observer mse

Each variant: load the model, apply the transforms (or not), calibrate (64 x 256 tokens), smooth
(alpha 0.3, lmdeploy w-stat), quantize with static input scales from `--observer`, write the
checkpoint, and score it with `lite eval`'s `score` against the float model on the first 48 windows.
"""

import argparse
import os
import tempfile

import torch

from lite import compressed_tensors as ct
from lite.data import calibration_tokens, load_text
from lite.eval import eval_windows, score
from lite.formats import load_checkpoint
from lite.model import decoder_blocks, load_model
from lite.observers import ActSettings
from lite.smooth import migration_scales
from lite.steps.stats import collect_statistics
from lite.steps.transforms import FuseNorms, Rotate, transform_


def checkpoint(model_dir, calib_text, transforms, observer, alpha, folder):
    loaded = load_model(model_dir, "float32")
    model, arch = loaded.model, loaded.arch
    if transforms:
        transform_(model, transforms)
    tokens = calibration_tokens(loaded.tokenizer, calib_text, 64, 256, 0, model.config.vocab_size)
    inputs, _ = collect_statistics(model, arch, tokens, 4, "cpu", progress=False)
    scales = migration_scales(decoder_blocks(model, arch), arch, model.config, inputs["absmax"], alpha, "lmdeploy")
    ct.quantize_model_(model, "int8", scales, ActSettings("static", observer), tokens, 4, "cpu", progress=False)
    ct.write_checkpoint(model, loaded.tokenizer, model_dir, folder)
    return load_checkpoint(folder)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--calib-text", required=True)
    p.add_argument("--eval-texts", required=True)
    p.add_argument("--observer", default="mse")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=48)
    args = p.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    reference = load_model(args.model, "float32")
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "smoothquant": checkpoint(args.model, args.calib_text, [], args.observer, args.alpha, os.path.join(tmp, "a")),
            "fuse_norms+rotate+smoothquant": checkpoint(args.model, args.calib_text,
                                                        [FuseNorms(), Rotate(seed=args.seed)], args.observer,
                                                        args.alpha, os.path.join(tmp, "b")),
        }
        for text in args.eval_texts.split(","):
            windows, _ = eval_windows(reference.tokenizer, load_text(text, eval_split=True), 512, args.windows)
            for name, model in variants.items():
                r = score(model, windows, 8, "cpu", reference.model, progress=False)
                print(f"{os.path.basename(text)}  {name:<32} observer {args.observer}  alpha {args.alpha}  "
                      f"KL {1e3 * r['kl']:.3f}e-3  top-1 {100 * r['top1_agreement']:.2f} %  ppl {r['perplexity']:.4f}")


if __name__ == "__main__":
    main()
