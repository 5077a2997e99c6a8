"""SmoothQuant (Xiao et al., 2023): migration scales from statistics, and folding them into modules.

For a producer P (a norm or a linear) feeding consumers C, the factor s over the channels between
them satisfies  C(P(x)) = (C · diag(s)) ((P / s)(x)): the activation is divided by s and the
consumer's weight columns multiplied by it, so the product is unchanged in exact arithmetic while
the activation outliers move into the weights. Eq. (4) of the paper:

    s_j = max|X_j|^alpha / w_j^(1 - alpha)

with w_j the weight statistic of input channel j (see `W_STATS`).
"""

import torch
import torch.nn as nn

from lite.archs import Arch, LinearPair, kv_group_index
from lite.errors import LiteError
from lite.quant import CHUNK_ELEMENTS, all_finite, row_chunks

# The smallest factor we allow: a dead channel (max|X_j| = 0) must not turn into a division by 0.
MIN_SCALE = 1e-5


def column_absmax(w: torch.Tensor) -> torch.Tensor:
    """The paper's weight statistic: max_i |W_ij| over output rows, `(in,)`."""
    return w.abs().amax(dim=0)


def row_normalized_mean(w: torch.Tensor) -> torch.Tensor:
    """lmdeploy's weight statistic: mean_i |W_ij| / max_k |W_ik|, `(in,)`.

    Normalizing each row first lets every output channel weigh equally, whatever its magnitude.
    """
    a = w.abs()
    return (a / a.amax(dim=1, keepdim=True).clamp(min=MIN_SCALE)).mean(dim=0)


W_STATS = {"absmax": column_absmax, "lmdeploy": row_normalized_mean}


def weight_statistic(weights: list[torch.Tensor], w_stat: str) -> torch.Tensor:
    """`W_STATS[w_stat]` of the weights stacked by rows, `(in,)`, in fp32; a chunk of rows at a time
    when they hold more than `CHUNK_ELEMENTS` (the mean then sums in another order: equal to rounding)."""
    if sum(w.numel() for w in weights) <= CHUNK_ELEMENTS:
        return W_STATS[w_stat](torch.cat([w.float() for w in weights]))
    total, rows = None, 0
    for w in weights:
        for chunk in row_chunks(w.shape[0], w.shape[1]):
            part = w[chunk].float()  # (rows, in)
            if w_stat == "absmax":
                value = column_absmax(part)
                total = value if total is None else torch.maximum(total, value)
            else:  # the mean of row_normalized_mean, as a sum over all rows divided once
                a = part.abs()
                value = (a / a.amax(dim=1, keepdim=True).clamp(min=MIN_SCALE)).sum(dim=0)
                total = value if total is None else total + value
            rows += part.shape[0]
    return total if w_stat == "absmax" else total / rows


def smoothing_factors(act_absmax: torch.Tensor, w_stat: torch.Tensor, alpha: float, normalize: bool):
    """Eq. (4): s = act_absmax^alpha / w_stat^(1 - alpha), clamped away from 0.

    With `normalize`, s is divided by sqrt(max(s) * min(s)) (lmdeploy), which centres log s on 0 so
    that producers and consumers change magnitude symmetrically.
    """
    a = act_absmax.float().clamp(min=MIN_SCALE)
    w = w_stat.float().clamp(min=MIN_SCALE)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=MIN_SCALE)
    if normalize:
        s = s / (s.max() * s.min()).sqrt()
    return s


def check_finite(fqn: str, t: torch.Tensor, what: str) -> None:
    """Raise naming the module and the first bad channel when `t` holds NaN or Inf."""
    if all_finite(t):
        return
    bad = ~torch.isfinite(t)
    if bad.any():
        index = tuple(i.item() for i in bad.nonzero()[0])
        if t.dim() == 2:  # a weight (out, in)
            where = f"output channel {index[0]}, input channel {index[1]}"
        else:
            where = f"channel {index[-1] if t.dim() else 0}"
        raise LiteError(
            f"{what} of {fqn} holds {t[index].item()} at {where}; "
            "the model or the statistics are corrupt — re-download the model or re-run `lite calibrate`"
        )


def _reduce_over_group(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Max of `x` over the entries that share an index: `(len(index),)` -> `(size,)`."""
    return torch.zeros(size, dtype=x.dtype, device=x.device).scatter_reduce(0, index, x, reduce="amax",
                                                                          include_self=False)


def migration_scales(
    blocks: dict[str, nn.Module], arch: Arch, config, act_absmax: dict[str, torch.Tensor],
    alpha: float, w_stat: str,
) -> dict[str, torch.Tensor]:
    """`{consumer linear fqn: s (in_features,)}` for every smoothing pair of every block.

    `blocks` maps each block's fqn prefix (`model.layers.3`) to the block; `act_absmax` maps linear
    fqns to max|X| over calibration tokens (`inputs_stats["absmax"]`).
    """
    normalize = w_stat == "lmdeploy"
    scales = {}
    for prefix, block in blocks.items():
        block_arch = arch.at(prefix)
        for pair in block_arch.norm_pairs:
            # Float readers (routers) take the factor when it is folded, but their weights do not shape it.
            quantized = [name for name in pair.linears if name not in block_arch.keep_float]
            names = [f"{prefix}.{name}" for name in quantized]
            weights = [block.get_submodule(name).weight.detach() for name in quantized]
            s = smoothing_factors(act_absmax[names[0]], weight_statistic(weights, w_stat), alpha, normalize)
            scales.update({name: s for name in names})
        for pair in block_arch.linear_pairs:
            consumer = f"{prefix}.{pair.consumer}"
            if consumer not in act_absmax and arch.experts and pair.consumer.startswith(arch.experts + "."):
                continue  # an expert no calibration token reached (warned when the statistics were made)
            w = block.get_submodule(pair.consumer).weight.detach()
            a, ws = act_absmax[consumer].float(), weight_statistic([w], w_stat)
            if pair.per_kv_head:
                # One factor per V channel: reduce over the query heads that read it, then repeat.
                index = kv_group_index(config).to(a.device)
                size = int(index.max()) + 1
                s = smoothing_factors(
                    _reduce_over_group(a, index, size), _reduce_over_group(ws, index, size), alpha, normalize
                )[index]
            else:
                s = smoothing_factors(a, ws, alpha, normalize)
            scales[consumer] = s
    return scales


@torch.no_grad()
def scale_columns_(linear: nn.Linear, s: torch.Tensor) -> None:
    """W <- W · diag(s): the consumer side of smoothing."""
    w = linear.weight
    for rows in row_chunks(*w.shape):
        w[rows] = (w[rows].float() * s).to(w.dtype)


@torch.no_grad()
def divide_norm_(norm: nn.Module, s: torch.Tensor, offset: float) -> None:
    """Fold 1/s into a norm computing x · (offset + w) (+ b): w <- (offset + w) / s - offset, b <- b / s."""
    w = norm.weight.float()
    norm.weight.copy_(((offset + w) / s - offset).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))


@torch.no_grad()
def divide_rows_(linear: nn.Linear, s: torch.Tensor, rows: slice | torch.Tensor) -> None:
    """Fold 1/s into the output rows `rows` (a slice, or an index tensor) of a producing linear (weight and
    bias)."""
    w = linear.weight
    if isinstance(rows, torch.Tensor):  # scattered rows (MLA's value rows): a small weight, in one piece
        rows = rows.to(w.device)
        w[rows] = (w[rows].float() / s[:, None]).to(w.dtype)
        if linear.bias is not None:
            linear.bias[rows] = (linear.bias[rows].float() / s).to(linear.bias.dtype)
        return
    first, last, _ = rows.indices(w.shape[0])
    for chunk in row_chunks(last - first, w.shape[1], first):
        w[chunk] = (w[chunk].float() / s[chunk.start - first:chunk.stop - first, None]).to(w.dtype)
    if linear.bias is not None:
        linear.bias[rows] = (linear.bias[rows].float() / s).to(linear.bias.dtype)


def producer_factor(pair: LinearPair, config, s_consumer: torch.Tensor) -> torch.Tensor:
    """The factor over the producer's channels that a consumer's factor came from."""
    if not pair.per_kv_head:
        return s_consumer
    index = kv_group_index(config).to(s_consumer.device)
    size = int(index.max()) + 1
    s = torch.empty(size, dtype=s_consumer.dtype, device=s_consumer.device)
    s[index] = s_consumer  # every query head of a group holds the same value
    return s


def fold_scales_(block: nn.Module, prefix: str, arch: Arch, config, scales: dict[str, torch.Tensor]) -> None:
    """Fold migration scales into one block: producers divided, consumers multiplied."""
    arch = arch.at(prefix)
    for pair in arch.norm_pairs:
        # Every reader of the norm takes its factor; float readers (routers) have none listed.
        names = [f"{prefix}.{name}" for name in pair.linears if name not in arch.keep_float]
        if names[0] not in scales:
            continue
        s = scales[names[0]].float()
        for name in names[1:]:
            if not torch.equal(scales[name], scales[names[0]]):
                raise LiteError(f"{name} and {names[0]} read the same input but have different migration scales")
        divide_norm_(block.get_submodule(pair.norm), s, arch.norm_offset)
        for name in pair.linears:
            scale_columns_(block.get_submodule(name), s)
    for pair in arch.linear_pairs:
        consumer = f"{prefix}.{pair.consumer}"
        if consumer not in scales:
            continue
        s = scales[consumer].float()
        producer = block.get_submodule(pair.producer)
        rows = pair.producer_rows(config) if pair.producer_rows else slice(0, producer.out_features)
        divide_rows_(producer, producer_factor(pair, config, s), rows)
        scale_columns_(block.get_submodule(pair.consumer), s)


# The largest relative change of the logits that folding random factors may cause: fp32 rounding
# is about 1e-6; a record that misses a reader of a norm or a producer changes them by percents.
FIT_TOLERANCE = 1e-4
_FITS = set()  # (config, record) pairs already checked in this process


@torch.no_grad()
def check_folding_fits(config, arch: Arch, trust_remote_code: bool = False) -> None:
    """Refuse a model whose `Arch` record does not describe it, before any work: fold random factors
    into every smoothing pair of a small random fp32 model of the same config (its first block of
    each layer type, MLP widths and expert count cut down, hidden size and heads kept) and check that
    its logits do not move. A record that misses a module reading a norm (gemma2's sandwich norms given
    gemma's record, say) fails here instead of exporting a model with percents of logit error."""
    from transformers import AutoModelForCausalLM

    from lite.archs import arch_for
    from lite.model import parameters_on_meta, shrunk_config
    from lite.moe import unfuse_experts_

    key = (config.to_json_string(), arch)
    if key in _FITS:
        return
    small = shrunk_config(config)
    with parameters_on_meta():  # filled once below: transformers' own initialization took a second
        model = AutoModelForCausalLM.from_config(small, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    real = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) not in real:  # a tied lm_head: the same new tensor as the embeddings
                # Norms (and biases) away from their constant start, so that folding shows; weights,
                # routers included, small and random.
                low = 0.5 - arch.norm_offset if p.dim() == 1 else -0.035
                values = torch.empty(p.shape, dtype=p.dtype).uniform_(low, low + 1.0 if p.dim() == 1 else 0.035,
                                                                      generator=generator)
                real[id(p)] = nn.Parameter(values, requires_grad=False)
            if p is not None:
                module._parameters[name] = real[id(p)]
    small_arch = arch_for(small)
    unfuse_experts_(model, small_arch)
    tokens = torch.randint(0, 64, (1, 24), generator=generator)
    before = model(input_ids=tokens, use_cache=False).logits
    blocks = model.get_submodule(small_arch.blocks)
    for i, block in enumerate(blocks):
        prefix, block_arch = f"{small_arch.blocks}.{i}", small_arch.of_block(i)
        scales = {}
        for pair in block_arch.norm_pairs:
            width = block.get_submodule(pair.norm).weight.shape[0]
            s = torch.rand(width, generator=generator) * 1.5 + 0.5
            scales.update({f"{prefix}.{name}": s for name in pair.linears})
        for pair in block_arch.linear_pairs:
            size = block.get_submodule(pair.consumer).in_features
            if pair.per_kv_head:
                index = kv_group_index(small)
                s = (torch.rand(int(index.max()) + 1, generator=generator) * 1.5 + 0.5)[index]
            else:
                s = torch.rand(size, generator=generator) * 1.5 + 0.5
            scales[f"{prefix}.{pair.consumer}"] = s
        fold_scales_(block, prefix, small_arch, small, scales)
    after = model(input_ids=tokens, use_cache=False).logits
    change = ((after - before).abs().max() / before.abs().max().clamp(min=1e-12)).item()
    if not change <= FIT_TOLERANCE:
        raise LiteError(f"the lite record for model_type {config.model_type!r} does not describe this model: "
                        f"folding smoothing factors changes its logits by {change:.1e} (relative; at most "
                        f"{FIT_TOLERANCE:g} allowed), so a module reading a norm or a producer is missing from "
                        "the record in lite/archs.py; please report it with the model's config.json")
    _FITS.add(key)
