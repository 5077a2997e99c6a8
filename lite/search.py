"""`--alpha auto`: the SmoothQuant strength of each decoder block chosen by measuring the quantized model.

On a small model which weights and activations round which way decides more than the smoothing
strength does, so no single alpha is best, and the best one differs between blocks and between int8
and fp8 (README, "Choosing the defaults"). The search measures instead of guessing. For each block
in order, every alpha of `ALPHA_GRID` is tried: the block is smoothed with it and quantized (W8A8,
weights per channel, activations per token), and the calibration windows go through the blocks
already chosen (quantized), this candidate, the remaining blocks in float and the LM head. The alpha
whose next-token distribution stays closest to the float model's on the calibration windows, by the
summed KL divergence KL(P_float || Q), is kept, and the next block sees the quantized block's outputs.

The objective is KL, not the next-token loss on the text: the loss rewards a candidate whose errors
flatten the predictions, and on held-out text such choices moved the model further from the float
one than the fixed default alpha (stories260K, KL in 10^-3 nats per token on tinystories-valid /
wikitext-2: int8 1.233 / 4.244 with the loss, 1.017 / 3.175 at alpha 0.3, 0.982 / 3.091 with KL;
fp8 11.990 / 36.760, 11.598 / 35.429, 10.436 / 33.702; README, "--alpha auto").

Cost: for a model of L blocks, `len(ALPHA_GRID)` · L candidate blocks (each smoothed, quantized, run,
and followed by the LM head) and `len(ALPHA_GRID)` · L(L - 1)/2 float block passes, against L block
passes for calibration alone; the whole model sits on the device during the search. Measured in
docs/benchmarks.md (8B-shaped blocks on an H200: about 0.9 s per fp8 candidate at 32 × 2048 tokens).
Use fewer `--calib-samples` on large models.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lite.archs import Arch, quantized_linears
from lite.calibrate import capture_block_inputs, run_block
from lite.errors import LiteError
from lite.model import decoder_blocks
from lite.qmodules import QLinear
from lite.quant import quant_dtype_of
from lite.smooth import fold_scales_, migration_scales

ALPHA_GRID = tuple(i / 20 for i in range(21))  # 0.00, 0.05, ..., 1.00
CACHE_BYTES = 1 << 30  # the float model's log-probabilities are kept when they fit this
KL_CHUNK = 512  # positions whose log-probabilities are taken at once: 0.5 GiB of float64 for a 128K vocabulary


def quantized_block(block: nn.Module, prefix: str, arch: Arch, config, scales: dict[str, torch.Tensor],
                    qdtype: torch.dtype) -> nn.Module:
    """A copy of `block` with `scales` folded in and every linear swapped for a per-token W8A8 QLinear."""
    candidate = copy.deepcopy(block)
    fold_scales_(candidate, prefix, arch, config, scales)
    for name in quantized_linears(arch, candidate):
        candidate.set_submodule(name, QLinear.from_linear(candidate.get_submodule(name), qdtype))
    return candidate


def final_hidden(model: nn.Module, arch: Arch, blocks: list[nn.Module], first: int, hidden: list[torch.Tensor],
                 kwargs: list[list[dict]]) -> list[torch.Tensor]:
    """The final norm's output at every position but the last, `(tokens, hidden)` per batch, after running
    the hidden states entering `blocks` (numbers `first`, `first + 1`, ...) through them."""
    norm = model.get_submodule(arch.final_norm)
    for index, block in enumerate(blocks, first):
        hidden = run_block(block, index, hidden, kwargs)
    return [norm(h[:, :-1]).reshape(-1, h.shape[-1]) for h in hidden]


def reference_logprobs(model: nn.Module, arch: Arch, reference: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The float model's log-probabilities per batch, `(tokens, vocab)` float64, when they fit `CACHE_BYTES`
    (else None: `kl_from_float` recomputes them from the final hidden states, chunk by chunk)."""
    head = model.get_submodule(arch.lm_head)
    if sum(h.shape[0] for h in reference) * head.out_features * 8 > CACHE_BYTES:
        return None
    return [F.log_softmax(head(h).double(), dim=-1) for h in reference]


def kl_from_float(model: nn.Module, arch: Arch, reference: list[torch.Tensor], candidate: list[torch.Tensor],
                  reference_logp: list[torch.Tensor] | None = None) -> float:
    """Summed KL(P || Q) over every position: P from the float model's final hidden states `reference` (or
    their log-probabilities `reference_logp`), Q from the candidate's, through the LM head, in float64."""
    head = model.get_submodule(arch.lm_head)
    total = 0.0
    for b, (ref, h) in enumerate(zip(reference, candidate)):
        for start in range(0, h.shape[0], KL_CHUNK):
            rows = slice(start, start + KL_CHUNK)
            logp = (reference_logp[b][rows] if reference_logp is not None
                    else F.log_softmax(head(ref[rows]).double(), dim=-1))  # (chunk, vocab)
            logq = F.log_softmax(head(h[rows]).double(), dim=-1)
            total += (logp.exp() * (logp - logq)).sum().item()
    return total


@torch.no_grad()
def search_alphas(model: nn.Module, arch: Arch, act_absmax: dict[str, torch.Tensor], w_stat: str, quant_dtype: str,
                  tokens: torch.Tensor, batch_size: int, device, progress: bool = True,
                  grid: tuple[float, ...] = ALPHA_GRID) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(`{consumer fqn: s}` for every smoothing pair, `{block prefix: chosen alpha}`).

    `act_absmax` is `inputs_stats["absmax"]` of the float model. The model is left unchanged (each
    candidate is a copy) and back on the CPU.
    """
    qdtype = quant_dtype_of(quant_dtype)
    blocks = decoder_blocks(model, arch)
    prefixes, modules = list(blocks), list(blocks.values())
    scales, chosen = {}, {}
    model.to(device)
    act_absmax = {fqn: a.to(device) for fqn, a in act_absmax.items()}
    try:
        hidden, kwargs = capture_block_inputs(model, arch, tokens, batch_size, device)
        reference = final_hidden(model, arch, modules, 0, hidden, kwargs)  # the float model's
        reference_logp = reference_logprobs(model, arch, reference)
        bar = tqdm(total=len(prefixes) * len(grid), desc="alpha search", unit="candidate", disable=not progress)
        for i, (prefix, block) in enumerate(zip(prefixes, modules)):
            best = None
            for alpha in grid:
                s = migration_scales({prefix: block}, arch, model.config, act_absmax, alpha, w_stat)
                candidate = quantized_block(block, prefix, arch, model.config, s, qdtype)
                out = run_block(candidate, i, hidden, kwargs)
                loss = kl_from_float(model, arch, reference,
                                     final_hidden(model, arch, modules[i + 1:], i + 1, out, kwargs), reference_logp)
                if best is None or loss < best[0]:
                    best = (loss, alpha, s, out)
                bar.update()
            _, chosen[prefix], s, hidden = best
            scales.update({fqn: factor.cpu() for fqn, factor in s.items()})
            bar.set_postfix_str(f"{prefix}: alpha {chosen[prefix]}")
        bar.close()
    except torch.OutOfMemoryError as e:
        raise LiteError(f"--alpha auto holds the whole model and the calibration activations on {device}, which ran "
                        "out of memory; use fewer --calib-samples, --device cpu, or a fixed --alpha") from e
    finally:
        model.to("cpu")
    return scales, chosen
