"""`--alpha auto`: the SmoothQuant strength of each decoder block chosen by measuring the quantized model.

On a small model which weights and activations round which way decides more than the smoothing
strength does, so no single alpha is best, and the best one differs between blocks and between int8
and fp8 (README, "Choosing the defaults"). The search measures instead of guessing. For each block
in order, every alpha of `ALPHA_GRID` is tried: the block is smoothed with it and quantized (W8A8,
weights per channel, activations per token), and the calibration windows go through the blocks
already chosen (quantized), this candidate, the remaining blocks in float and the LM head. The alpha
whose next-token loss on the calibration windows is lowest is kept, and the next block sees the
quantized block's outputs.

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
LOSS_CHUNK = 2048  # positions whose logits are computed at once: 1 GB of fp32 for a 128K vocabulary


def quantized_block(block: nn.Module, prefix: str, arch: Arch, config, scales: dict[str, torch.Tensor],
                    qdtype: torch.dtype) -> nn.Module:
    """A copy of `block` with `scales` folded in and every linear swapped for a per-token W8A8 QLinear."""
    candidate = copy.deepcopy(block)
    fold_scales_(candidate, prefix, arch, config, scales)
    for name in quantized_linears(arch, candidate):
        candidate.set_submodule(name, QLinear.from_linear(candidate.get_submodule(name), qdtype))
    return candidate


def next_token_loss(model: nn.Module, arch: Arch, blocks: list[nn.Module], hidden: list[torch.Tensor],
                    kwargs: list[dict], batches: list[torch.Tensor]) -> float:
    """Summed next-token negative log-likelihood of `batches`, given the hidden states entering `blocks`
    (the model's remaining blocks) for each batch."""
    head, norm = model.get_submodule(arch.lm_head), model.get_submodule(arch.final_norm)
    for block in blocks:
        hidden = run_block(block, hidden, kwargs)
    total = 0.0
    for h, ids in zip(hidden, batches):
        h = norm(h[:, :-1]).reshape(-1, h.shape[-1])  # (tokens, hidden): every position but the last
        targets = ids[:, 1:].reshape(-1).to(h.device)
        for start in range(0, h.shape[0], LOSS_CHUNK):
            rows = slice(start, start + LOSS_CHUNK)
            logits = head(h[rows]).float()  # (chunk, vocab)
            total += F.cross_entropy(logits, targets[rows], reduction="sum").item()
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
        batches = list(tokens.split(batch_size))
        hidden, kwargs = capture_block_inputs(model, arch, tokens, batch_size, device)
        bar = tqdm(total=len(prefixes) * len(grid), desc="alpha search", unit="candidate", disable=not progress)
        for i, (prefix, block) in enumerate(zip(prefixes, modules)):
            best = None
            for alpha in grid:
                s = migration_scales({prefix: block}, arch, model.config, act_absmax, alpha, w_stat)
                candidate = quantized_block(block, prefix, arch, model.config, s, qdtype)
                out = run_block(candidate, hidden, kwargs)
                loss = next_token_loss(model, arch, modules[i + 1:], out, kwargs, batches)
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
