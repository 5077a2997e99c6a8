"""`awq`: activation-aware weight scaling (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", Sec. 3.2), block by block.

For each smoothing pair of the architecture table (norm → q/k/v, v → o, norm → gate/up, up → down),
the consumers' input columns are multiplied by s and the producer divided by it, which leaves the
float model unchanged but moves rounding error away from the channels that carry large activations.
s = mean|x|^r / mean_w^(1−r) (mean_w: each weight's magnitude relative to its group's largest,
averaged over rows), normalized so that sqrt(max · min) = 1; the ratio r is chosen from a grid (plus
s = 1, so the search never loses to no scaling) by the output error of the whole sub-module (the
attention for q/k/v, the MLP for gate/up, the consumer linear for v → o and up → down) on the block's
calibration inputs, with the consumers' weights quantized as the following step will quantize them
(clipping ranges searched by the output error, on a coarser grid).
With grouped-query attention, one factor per V channel serves every query head that reads it.

The scales are left on `block.scales`; the quantizing step that follows (`rtn` with `bits`, or
`gptq`) folds them into the producers and consumers exactly as SmoothQuant's are folded.
"""

import torch

from lite.archs import kv_group_index, num_experts
from lite.errors import LiteError
from lite.observers import Hessian
from lite.kernels import mse_clip
from lite.quant import dequantize_weight, quantize_weight, weight_qparams
from lite.smooth import MIN_SCALE, _reduce_over_group
from lite.steps.base import Block, Hook, Step
from lite.weight_only import WeightScheme


def _common_parent(names) -> str:
    """The deepest module holding every one of `names` (dotted), "" for the block itself."""
    common = []
    for level in zip(*(name.split(".")[:-1] for name in names)):
        if any(part != level[0] for part in level):
            break
        common.append(level[0])
    return ".".join(common)


class Calls:
    """What a module was called with and returned during the block's forward: the mean |x| of its input
    channels over every token, and the first calls up to `max_tokens` tokens, to run it again. With
    `cut_rows` (a linear's calls, whose rows are independent tokens) the last call kept is cut to exactly
    `max_tokens`; otherwise (attention, an MLP: masks and positions per call) whole calls are kept."""

    def __init__(self, max_tokens: int, cut_rows: bool = False):
        self.max_tokens, self.cut_rows, self.calls, self.tokens = max_tokens, cut_rows, [], 0
        self.abs_sum, self.count = None, 0

    def update_call(self, args, kwargs, out) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        total = flat.float().abs().sum(dim=0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.count += flat.shape[0]
        if self.tokens < self.max_tokens:
            out, kept = out[0] if isinstance(out, tuple) else out, flat.shape[0]
            if self.cut_rows and self.tokens + kept > self.max_tokens:
                kept = self.max_tokens - self.tokens
                # copies: a view would keep the whole call's tensors alive
                args, out = (flat[:kept].clone(),), out.reshape(-1, out.shape[-1])[:kept].clone()
            self.calls.append((args, kwargs, out))
            self.tokens += kept

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count


# Clip ratios the search tries for each candidate s (the quantizing step then searches 51).
SEARCH_CLIPS = torch.linspace(0.75, 1.0, 6)  # measured on stories260K: KL as with 11 from 0.5


def _fake_quantize(w: torch.Tensor, scheme: WeightScheme, hessian: torch.Tensor | None) -> torch.Tensor:
    """w `(out, in)` quantized and dequantized as the quantizing step will: with `hessian` `(groups, g, g)`,
    each group's clipping range chosen by the output error it adds."""
    if hessian is None:
        scale, zero = weight_qparams(w, scheme.bits, scheme.group_size, scheme.symmetric)
    else:
        scale, zero = mse_clip(w, scheme.bits, scheme.group_size, scheme.symmetric, SEARCH_CLIPS, hessian=hessian)
    return dequantize_weight(quantize_weight(w, scale, zero, scheme.bits, scheme.group_size), scale, zero,
                             scheme.group_size)


class Awq(Step):
    """Settings: `bits`, `group_size`, `symmetric` (the scheme the following step quantizes to), `n_grid`
    (ratios r = 0, 1/n, ..., (n−1)/n), `max_tokens` (calibration tokens per sub-module the search runs on; a
    MoE expert's own pairs take the share routing gives one expert, `max_tokens · top_k / experts`: with
    every expert calibrated on every token, 128 experts' full inputs and outputs took 60 GiB per block),
    `clip` (quantize each candidate with its clipping ranges searched, as `rtn`'s `mse` will; false:
    the full range, as the paper)."""

    def __init__(self, bits: int = 4, group_size: int = 128, symmetric: bool = False, n_grid: int = 20,
                 max_tokens: int = 65536, clip: bool = True, channel_fallback: bool = False):
        self.scheme = WeightScheme(bits, group_size, symmetric, channel_fallback)
        if not (isinstance(n_grid, int) and n_grid > 0):
            raise LiteError(f"awq n_grid must be a positive integer, got {n_grid!r}")
        if not (isinstance(max_tokens, int) and max_tokens > 0):
            raise LiteError(f"awq max_tokens must be a positive integer, got {max_tokens!r}")
        self.n_grid, self.max_tokens, self.clip = n_grid, max_tokens, bool(clip)
        self._pairs = []
        self.ratios = {}  # {consumer fqn: the ratio chosen, or None for s = 1}
        self.losses = {}  # {consumer fqn: (search loss with the chosen s, with s = 1)}

    def _plan(self, block: Block) -> list[tuple[tuple[str, ...], str, bool]]:
        """[(consumers, module whose calls are inspected, one factor per KV head?)] for the block."""
        plan = []
        for pair in block.arch.norm_pairs:
            # Float readers (MoE routers) take the factor unquantized: the search leaves them as they are.
            consumers = tuple(name for name in pair.linears if name not in block.arch.keep_float)
            # The loss is the output of the module holding them all (attention, MLP, MoE layer).
            plan.append((consumers, _common_parent(consumers), False))  # "": the whole (parallel) block
        for pair in block.arch.linear_pairs:
            plan.append(((pair.consumer,), pair.consumer, pair.per_kv_head))
        return plan

    def observers(self, block: Block) -> list[Hook]:
        self._pairs = [(consumers, inspect, per_kv,
                        Calls(self._max_tokens(block, inspect), cut_rows=consumers == (inspect,)))
                       for consumers, inspect, per_kv in self._plan(block)]
        return [Hook(inspect, "call", calls) for _, inspect, _, calls in self._pairs]

    def _max_tokens(self, block: Block, inspect: str) -> int:
        """The tokens a search keeps for `inspect`: inside one expert, its average routed share."""
        experts = block.arch.experts
        if experts and inspect.startswith(experts + "."):
            share = block.config.num_experts_per_tok / num_experts(block.config)
            return max(1, int(self.max_tokens * share))
        return self.max_tokens

    @torch.no_grad()
    def apply_(self, block: Block) -> None:
        for consumers, inspect, per_kv, calls in self._pairs:
            s, ratio, losses = self._search(block, consumers, inspect, per_kv, calls)
            for name in consumers:
                block.scales[f"{block.prefix}.{name}"] = s
                self.ratios[f"{block.prefix}.{name}"] = ratio
                self.losses[f"{block.prefix}.{name}"] = losses
        self._pairs = []

    def _search(self, block: Block, consumers, inspect: str, per_kv: bool, calls: Calls):
        """(s `(in,)` fp32, the ratio it came from or None for s = 1, (its loss, the loss of s = 1)): the s with
        the least output error of `inspect`."""
        module = block.module.get_submodule(inspect)
        linears = [block.module.get_submodule(name) for name in consumers]
        originals = [linear.weight.detach().clone() for linear in linears]
        W = torch.cat(originals).float()  # (Σ out, in)
        scheme = self.scheme.for_linear(W.shape[1])
        g = W.shape[1] if scheme.group_size == -1 else scheme.group_size
        w_abs = W.abs().reshape(-1, g)  # (Σ out · groups, g)
        w_mean = (w_abs / w_abs.amax(dim=1, keepdim=True).clamp(min=MIN_SCALE)).reshape(W.shape).mean(dim=0)  # (in,)
        x_mean = calls.mean_abs()  # (in,)
        if per_kv:  # one factor per V channel, shared by the query heads that read it
            index = kv_group_index(block.config).to(W.device)
            size = int(index.max()) + 1
            x_mean, w_mean = _reduce_over_group(x_mean, index, size), _reduce_over_group(w_mean, index, size)
        candidates = [(None, torch.ones_like(x_mean))]
        for i in range(self.n_grid):
            r = i / self.n_grid
            s = (x_mean.pow(r) / w_mean.clamp(min=MIN_SCALE).pow(1 - r)).clamp(min=MIN_SCALE)
            candidates.append((r, s / (s.max() * s.min()).sqrt()))
        H = None
        if self.clip:  # the diagonal blocks of E[x xᵀ] of the consumers' input, on the searched tokens
            H = Hessian(scheme.group_size)
            for args, kwargs, _ in calls.calls:
                H.update(args[0] if args else kwargs["hidden_states"])
            H = H.result()
        best, best_loss = None, float("inf")
        for r, s in candidates:
            s_in = s[index] if per_kv else s  # (in,)
            sg = s_in.reshape(-1, g)  # (groups, g)
            Hs = None if H is None else H / (sg[:, :, None] * sg[:, None, :])  # of the scaled input x / s
            for linear, w in zip(linears, originals):
                linear.weight.copy_((_fake_quantize(w.float() * s_in, scheme, Hs) / s_in).to(w.dtype))
            loss = 0.0
            for args, kwargs, target in calls.calls:
                out = module(*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                loss += (out.float() - target.float()).pow(2).sum().item()
            if r is None:
                unscaled = loss
            if loss < best_loss:
                best, best_loss = (s_in.float(), r), loss
        for linear, w in zip(linears, originals):
            linear.weight.copy_(w)
        return *best, (best_loss, unscaled)
