"""How to choose SmoothQuant's alpha, compared on held-out perplexity (docs/compressed-tensors.md,
"`--alpha auto`: measuring instead of guessing").

Every choice quantizes the model in memory (W8A8, per-token activations, as
`--format compressed-tensors` computes) and prints its perplexity change against the float model on
--eval-text; `global` also prints the change on the calibration windows themselves.

- `global`: one alpha for every block, each of 0, 0.05, ..., 1.
- `greedy-nll`: lite's `--alpha auto` (lite/steps/alpha_search.py): blocks in order, each alpha scored by the
  whole model's next-token loss on the calibration windows (blocks before quantized, after float).
- `greedy-kl`: the same, scored by the KL divergence to the float model's next-token distribution.
- `greedy-mse`: the same, scored by the squared error of the block's own output against the float
  block's (quantized inputs propagated).
- `coordinate`: start from alpha 0.5 everywhere (all blocks quantized), then two passes over the
  blocks, each block's alpha re-chosen by the whole quantized model's next-token loss; reported
  after each pass.

    python scripts/compare_alpha_choices.py ../shared/models/stories260K-hf --calib-text ../shared/text/tinystories-train.txt \\
        --eval-text ../shared/text/tinystories-valid.txt --quant-dtype fp8 --w-stat absmax --choices global,greedy-nll
"""

import argparse
import copy

import torch
import torch.nn.functional as F

from lite.calibrate import capture_block_inputs, run_block
from lite.steps.stats import collect_statistics
from lite.data import calibration_tokens
from lite.eval import eval_windows, perplexity
from lite.model import decoder_blocks, load_model
from lite.quant import quant_dtype_of
from lite.steps.alpha_search import ALPHA_GRID, quantized_block, search_alphas
from lite.smooth import migration_scales


class Job:
    def __init__(self, args):
        self.loaded = load_model(args.model)
        self.model, self.arch, self.config = self.loaded.model, self.loaded.arch, self.loaded.model.config
        self.tokens = calibration_tokens(self.loaded.tokenizer, args.calib_text, args.calib_samples, args.calib_seqlen, 0)
        inputs, _ = collect_statistics(self.model, self.arch, self.tokens, 4, "cpu", progress=False)
        self.absmax, self.w_stat, self.qdtype = inputs["absmax"], args.w_stat, quant_dtype_of(args.quant_dtype)
        self.quant_dtype = args.quant_dtype
        with open(args.eval_text) as f:
            self.windows, _ = eval_windows(self.loaded.tokenizer, f.read(), args.seqlen)
        self.blocks = decoder_blocks(self.model, self.arch)
        self.float_valid = perplexity(self.model, self.windows, 32, progress=False)
        self.float_calib = perplexity(self.model, self.tokens, 32, progress=False)

    def block_at(self, prefix: str, alpha: float):
        block = self.blocks[prefix]
        scales = migration_scales({prefix: block}, self.arch, self.config, self.absmax, alpha, self.w_stat)
        return quantized_block(block, prefix, self.arch, self.config, scales, self.qdtype)

    def quantized(self, alphas: dict[str, float]):
        model = copy.deepcopy(self.model)
        layers = model.get_submodule(self.arch.blocks)
        for index, prefix in enumerate(self.blocks):
            layers[index] = self.block_at(prefix, alphas[prefix])
        return model

    def report(self, name: str, alphas: dict[str, float], calib: bool = False) -> None:
        model = self.quantized(alphas)
        valid = 100 * (perplexity(model, self.windows, 32, progress=False) / self.float_valid - 1)
        line = f"{name:<18} alphas {list(alphas.values())}  valid {valid:+.3f}%"
        if calib:
            line += f"  calibration windows {100 * (perplexity(model, self.tokens, 32, progress=False) / self.float_calib - 1):+.3f}%"
        print(line, flush=True)


@torch.no_grad()
def greedy(job: Job, objective: str) -> dict[str, float]:
    """One pass over the blocks; each block's alpha scored by `objective` (kl or mse)."""
    hidden, kwargs = capture_block_inputs(job.model, job.arch, job.tokens, 4, "cpu")
    float_hidden, modules, chosen = hidden, list(job.blocks.values()), {}
    head, norm = job.model.get_submodule(job.arch.lm_head), job.model.get_submodule(job.arch.final_norm)
    reference = [F.log_softmax(l.float(), -1) for l in job.model(input_ids=job.tokens, use_cache=False).logits.split(4)]
    for i, prefix in enumerate(job.blocks):
        float_out = run_block(modules[i], i, float_hidden, kwargs)
        best = None
        for alpha in ALPHA_GRID:
            out = run_block(job.block_at(prefix, alpha), i, hidden, kwargs)
            if objective == "mse":
                loss = sum(((q - f) ** 2).sum().item() for q, f in zip(out, float_out))
            else:
                tail = out
                for index, block in enumerate(modules[i + 1:], i + 1):
                    tail = run_block(block, index, tail, kwargs)
                loss = sum(F.kl_div(F.log_softmax(head(norm(h)).float(), -1), r, log_target=True, reduction="sum").item()
                           for h, r in zip(tail, reference))
            if best is None or loss < best[0]:
                best = (loss, alpha, out)
        _, chosen[prefix], hidden = best
        float_hidden = float_out
    return chosen


@torch.no_grad()
def coordinate(job: Job, passes: int = 2, start: float = 0.5):
    """Yields the alphas after each pass."""
    alphas = {prefix: start for prefix in job.blocks}
    batches = list(job.tokens.split(4))
    for _ in range(passes):
        for prefix in job.blocks:
            best = None
            for alpha in ALPHA_GRID:
                model = job.quantized({**alphas, prefix: alpha})
                loss = sum(F.cross_entropy(model(input_ids=b, use_cache=False).logits[:, :-1].flatten(0, 1).float(),
                                           b[:, 1:].flatten(), reduction="sum").item() for b in batches)
                if best is None or loss < best[0]:
                    best = (loss, alpha)
            alphas[prefix] = best[1]
        yield dict(alphas)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--calib-text", required=True)
    p.add_argument("--eval-text", required=True)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--quant-dtype", default="fp8")
    p.add_argument("--w-stat", default="absmax")
    p.add_argument("--choices", default="global,greedy-nll,greedy-kl,greedy-mse,coordinate")
    args = p.parse_args()
    job = Job(args)
    for choice in args.choices.split(","):
        if choice == "global":
            for alpha in ALPHA_GRID:
                job.report(f"global {alpha}", {prefix: alpha for prefix in job.blocks}, calib=True)
        elif choice == "greedy-nll":
            _, chosen = search_alphas(job.model, job.arch, job.absmax, job.w_stat, job.quant_dtype, job.tokens, 4,
                                      "cpu", progress=False)
            job.report(choice, chosen)
        elif choice in ("greedy-kl", "greedy-mse"):
            job.report(choice, greedy(job, choice.partition("-")[2]))
        elif choice == "coordinate":
            for done, alphas in enumerate(coordinate(job), 1):
                job.report(f"{choice} pass {done}", alphas)
        else:
            raise SystemExit(f"unknown choice {choice!r}")


if __name__ == "__main__":
    main()
