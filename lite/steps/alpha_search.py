"""`alpha_search` (`--alpha auto`): the SmoothQuant strength of each decoder block chosen by measuring the
quantized model.

On a small model which weights and activations round which way decides more than the smoothing
strength does, so no single alpha is best, and the best one differs between blocks and between int8
and fp8 (README, "Choosing the defaults"). The search measures instead of guessing. In the sweep, for
each block in order, every alpha of `ALPHA_GRID` is tried: the block is smoothed with it and quantized
(W8A8, weights per channel, activations per token), and the calibration windows go through the blocks
already chosen (quantized), this candidate, the remaining blocks in float and the LM head. The alpha
whose next-token distribution stays closest to the float model's on the calibration windows, by the
summed KL divergence KL(P_float || Q), is kept, and the next block sees the quantized block's outputs.

The objective is KL, not the next-token loss on the text: the loss rewards a candidate whose errors
flatten the predictions, and on held-out text such choices moved the model further from the float
one than the fixed default alpha (stories260K, KL in 10^-3 nats per token on tinystories-valid /
wikitext-2: int8 1.233 / 4.244 with the loss, 1.017 / 3.175 at alpha 0.3, 0.982 / 3.091 with KL;
fp8 11.990 / 36.760, 11.598 / 35.429, 10.436 / 33.702; README, "--alpha auto").

The float tail is the model's own forward: the blocks already chosen are stood in for by the cached
inputs of this block (their `forward` replaced for the call), the candidate takes this block's place,
and the model runs the remaining blocks, the final norm and the LM head itself, with the masks and
positions it builds. So the search needs the whole model on the device (a `Loaded` source): it
refuses with a one-line error when the device runs out of memory.

Cost: for a model of L blocks, `len(ALPHA_GRID)` · L candidate blocks (each smoothed, quantized, run,
and followed by the LM head) and `len(ALPHA_GRID)` · L(L - 1)/2 float block passes, against L block
passes for calibration alone. Measured in docs/benchmarks.md (8B-shaped blocks on an H200: about 0.9 s
per fp8 candidate at 32 × 2048 tokens). Use fewer `--calib-samples` on large models.
"""

import copy
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from lite.archs import Arch, quantized_linears
from lite.errors import LiteError
from lite.model import move_outside_blocks_
from lite.qmodules import QLinear
from lite.quant import quant_dtype_of
from lite.smooth import fold_scales_, migration_scales
from lite.steps.base import Block, Hook, Step

ALPHA_GRID = tuple(i / 20 for i in range(21))  # 0.00, 0.05, ..., 1.00
CACHE_BYTES = 1 << 30  # the float model's log-probabilities are kept when they fit this
KL_CHUNK = 512  # positions whose log-probabilities are taken at once: 0.5 GiB of float64 for a 128K vocabulary


def quantized_block(block: nn.Module, prefix: str, arch: Arch, config, scales: dict[str, torch.Tensor],
                    qdtype: torch.dtype) -> nn.Module:
    """A copy of `block` with `scales` folded in and every linear swapped for a per-token W8A8 QLinear."""
    candidate = copy.deepcopy(block)
    quantize_in_place_(candidate, prefix, arch, config, scales, qdtype)
    return candidate


def quantize_in_place_(block: nn.Module, prefix: str, arch: Arch, config, scales: dict[str, torch.Tensor],
                       qdtype: torch.dtype) -> None:
    fold_scales_(block, prefix, arch, config, scales)
    for name in quantized_linears(arch.at(prefix), block):
        block.set_submodule(name, QLinear.from_linear(block.get_submodule(name), qdtype))


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


class _Inputs:
    """The hidden states a block was called with, one tensor per batch (an observer of whole calls)."""

    def __init__(self):
        self.hidden = []

    def update_call(self, args, kwargs, out) -> None:
        self.hidden.append(args[0] if args else kwargs["hidden_states"])


class AlphaSearch(Step):
    """Settings: `absmax` (`{linear fqn: max|x|}` of the float model, `inputs_stats["absmax"]`), `w_stat`
    and `quant_dtype` (as `smoothquant` and the export use them), `grid` (the alphas tried). Leaves
    `scales` (`{consumer fqn: s}`) and `chosen` (`{block prefix: alpha}`); the model is left as it was."""

    propagates_quantized = True  # the next block is searched on this block's quantized outputs

    def __init__(self, absmax: dict, w_stat: str = "lmdeploy", quant_dtype: str = "int8",
                 grid: tuple[float, ...] = ALPHA_GRID):
        if not grid or not all(isinstance(a, (int, float)) and 0 <= a <= 1 for a in grid):
            raise LiteError(f"alpha_search grid must be alphas in [0, 1], got {grid!r}")
        self.absmax, self.w_stat, self.grid = absmax, w_stat, tuple(grid)
        self.qdtype = quant_dtype_of(quant_dtype)
        self.scales, self.chosen = {}, {}
        self._inputs, self._restore = None, None

    def start(self, run) -> None:
        source = run.source
        if not hasattr(source, "model") or getattr(source, "reads_embeddings", False):
            raise LiteError("--alpha auto runs the float model after each candidate block: it needs the model "
                            "loaded in memory, not streamed")
        self.model, self.arch, self.tokens, self.device = source.model, source.arch, run.tokens, run.device
        self.base = self.model.get_submodule(self.arch.blocks.rsplit(".", 1)[0])  # embeddings, blocks, final norm
        self.model.to(self.device)
        self.absmax = {fqn: a.to(self.device) for fqn, a in self.absmax.items()}
        self.reference = self.reference_logp = None

    def prepare_(self, block: Block) -> None:
        self._put_back()

    def observers(self, block: Block) -> list[Hook]:
        self._inputs = _Inputs()
        return [Hook("", "call", self._inputs)]

    @torch.no_grad()
    def apply_(self, block: Block) -> None:
        move_outside_blocks_(self.model, self.arch, self.device)  # the sweep put them back after its capture
        batches = self.tokens.split([h.shape[0] for h in self._inputs.hidden])
        if self.reference is None:  # the float model's final hidden states, before any block is changed
            self.reference = self._final_hidden(batches, block.index, None)
            self.reference_logp = reference_logprobs(self.model, self.arch, self.reference)
        best = None
        for alpha in self.grid:
            s = migration_scales({block.prefix: block.module}, block.arch, block.config, self.absmax, alpha,
                                 self.w_stat)
            candidate = quantized_block(block.module, block.prefix, block.arch, block.config, s, self.qdtype)
            loss = kl_from_float(self.model, self.arch, self.reference,
                                 self._final_hidden(batches, block.index, candidate), self.reference_logp)
            if best is None or loss < best[0]:
                best = (loss, alpha, s)
        _, self.chosen[block.prefix], s = best
        self.scales.update({fqn: factor.cpu() for fqn, factor in s.items()})
        # The block computes the chosen quantized candidate until the next block starts (the sweep runs
        # it again for the next block's inputs); its float weights come back then.
        linears = {name: block.module.get_submodule(name) for name in quantized_linears(block.arch, block.module)}
        state = {k: v.clone() for k, v in block.module.state_dict().items()}
        quantize_in_place_(block.module, block.prefix, block.arch, block.config, s, self.qdtype)
        self._restore = (block.module, linears, state)
        self._inputs = None

    def end(self, run) -> None:
        self._put_back()
        self.model.to("cpu")

    def _put_back(self) -> None:
        if self._restore is not None:
            module, linears, state = self._restore
            for name, linear in linears.items():
                module.set_submodule(name, linear)
            module.load_state_dict(state)
            self._restore = None

    def _final_hidden(self, batches, index: int, candidate: nn.Module | None) -> list[torch.Tensor]:
        """The final norm's output at every position but the last, `(tokens, hidden)` per batch, of the
        model's own forward with block `index` replaced by `candidate` (None: the float model) on this
        block's cached inputs."""
        out = []
        for tokens, hidden in zip(batches, self._inputs.hidden):
            with self._standing_in(index, hidden, candidate):
                h = self.base(input_ids=tokens.to(self.device), use_cache=False).last_hidden_state
            out.append(h[:, :-1].reshape(-1, h.shape[-1]))
        return out

    @contextmanager
    def _standing_in(self, index: int, hidden: torch.Tensor, candidate: nn.Module | None):
        """Blocks 0 .. index-1 hand on this block's cached input (their work is done: `hidden` is their
        output) and block `index` is `candidate`, for the calls inside."""
        layers = list(self.model.get_submodule(self.arch.blocks))
        replaced = []
        try:
            if index > 0:
                layers[0].forward = lambda *args, **kw: hidden
                replaced += [layers[0]]
                for layer in layers[1:index]:
                    layer.forward = lambda *args, **kw: args[0] if args else kw["hidden_states"]
                    replaced.append(layer)
            if candidate is not None:
                layers[index].forward = candidate.forward
                replaced.append(layers[index])
            yield
        finally:
            for layer in replaced:
                del layer.forward  # the class's forward again


@torch.no_grad()
def search_alphas(model: nn.Module, arch: Arch, act_absmax: dict[str, torch.Tensor], w_stat: str, quant_dtype: str,
                  tokens: torch.Tensor, batch_size: int, device, progress: bool = True,
                  grid: tuple[float, ...] = ALPHA_GRID) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(`{consumer fqn: s}` for every smoothing pair, `{block prefix: chosen alpha}`): one sweep of
    `AlphaSearch` over the model in memory, which is left unchanged and back on the CPU."""
    from lite.source import Loaded
    from lite.sweep import sweep

    step = AlphaSearch(act_absmax, w_stat, quant_dtype, grid)
    try:
        # The whole model is on the device anyway: no budget to plan against; the batch size is the caller's.
        sweep(Loaded(model, arch), [step], tokens, batch_size=batch_size, device=device, progress=progress,
              max_gpu_memory="1024GiB")
    except torch.OutOfMemoryError as e:
        raise LiteError(f"--alpha auto holds the whole model and the calibration activations on {device}, which ran "
                        "out of memory; use fewer --calib-samples, --device cpu, or a fixed --alpha") from e
    finally:
        step._put_back()
        model.to("cpu")
    return step.scales, step.chosen
