"""Mixture-of-Experts layers with one `nn.Linear` per expert.

transformers 5 holds a MoE layer's experts as two fused 3-D parameters, `experts.gate_up_proj`
`(E, 2I, H)` (gate rows first, then up) and `experts.down_proj` `(E, H, I)` (gpt_oss: transposed, gate
and up interleaved, with biases, and its own clamped gate function), while checkpoints store
one linear per expert (`mlp.experts.{e}.gate_proj.weight`, ...; transformers fuses them at load time
and splits them again when it saves). `unfuse_experts_` puts `Experts` in their place: a list of
per-expert MLPs under the checkpoint's names with the same forward. Every step, observer and format
then sees each expert as the linear it is, and a streamed model reads the checkpoint's tensors by
their own names.

Calibration: while `every_expert_sees_all_tokens` is on (the sweep's observed forward, unless
`--moe-calibrate-all-experts false`), each expert also runs on the tokens routing did not send it, so its
observers see the whole batch, while the layer's output still mixes only the routed experts' outputs:
the next block sees what it would see in service. `routed_tokens` counts, per expert, the tokens the
model's own routing sent it.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn as nn

from lite.errors import LiteError


class Expert(nn.Module):
    """One expert's MLP: down(act(gate(x)) * up(x)), or, where the family gates otherwise (gpt_oss),
    down(apply_gate(gate(x), up(x) in the fused layout)) with the family's own gate function."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype, device, bias: bool = False,
                 apply_gate=None, interleaved: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias, dtype=dtype, device=device)
        self.act_fn = act_fn
        self.apply_gate, self.interleaved = apply_gate, interleaved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.apply_gate is None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        g, u = self.gate_proj(x), self.up_proj(x)
        gate_up = torch.stack((g, u), -1).flatten(-2) if self.interleaved else torch.cat((g, u), -1)
        return self.down_proj(self.apply_gate(gate_up))


@dataclass(frozen=True)
class FusedLayout:
    """Where a family's fused expert tensors (`gate_up_proj` `(E, 2I, H)`, `down_proj` `(E, H, I)`, and
    their `_bias` `(E, 2I)`, `(E, H)`) hold each expert's gate/up/down, by transformers' flags:
    `transposed` weights are `(E, in, out)`; `interleaved` gate/up rows go gate0, up0, gate1, ... instead
    of [gate; up]. Checkpoints that store the experts fused (gpt_oss) are read through it."""

    transposed: bool = False
    interleaved: bool = False

    @staticmethod
    def fused_name(name: str) -> tuple[str, int, str, bool] | None:
        """`X.experts.3.gate_proj.weight` -> (`X.experts.gate_up_proj`, 3, "gate_proj", False); `.bias` ->
        (`X.experts.gate_up_proj_bias`, 3, "gate_proj", True); None for a name that is no expert's."""
        parts = name.split(".")
        if len(parts) < 4 or not parts[-3].isdigit() or parts[-2] not in PROJECTIONS or \
                parts[-1] not in ("weight", "bias"):
            return None
        bias = parts[-1] == "bias"
        fused = "down_proj" if parts[-2] == "down_proj" else "gate_up_proj"
        return ".".join(parts[:-3] + [fused + ("_bias" if bias else "")]), int(parts[-3]), parts[-2], bias

    def _row(self, proj: str, r: int, gate_up_rows: int) -> int:
        if proj == "down_proj":
            return r
        if self.interleaved:
            return 2 * r + (proj == "up_proj")
        return r + (gate_up_rows // 2 if proj == "up_proj" else 0)

    def take(self, fused: torch.Tensor, e: int, proj: str, bias: bool) -> torch.Tensor:
        """Expert `e`'s `proj` weight `(out, in)` or bias `(out,)` (a view) from the fused tensor."""
        t = fused[e] if bias or not self.transposed else fused[e].T
        if proj == "down_proj":
            return t
        if self.interleaved:
            return t[(proj == "up_proj")::2]
        half = t.shape[0] // 2
        return t[:half] if proj == "gate_proj" else t[half:]

    def flat_indices(self, fused_shape, e: int, proj: str, bias: bool, picks: list[int]) -> list[int]:
        """Where the elements `picks` (flat) of `take(...)` lie in the fused tensor (flat)."""
        per_expert = fused_shape[1:]
        out_rows = per_expert[0] if bias or not self.transposed else per_expert[1]  # 2I for gate_up, H for down
        base = e * int(torch.tensor(per_expert).prod())
        if bias:
            return [base + self._row(proj, k, out_rows) for k in picks]
        cols = per_expert[0] if self.transposed else per_expert[1]  # the per-expert weight's `in`
        out = []
        for k in picks:
            r, c = divmod(k, cols)
            row = self._row(proj, r, out_rows)
            out.append(base + (c * per_expert[1] + row if self.transposed else row * per_expert[1] + c))
        return out


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Experts(nn.ModuleList):
    """Per-expert MLPs called like transformers' fused experts: `(tokens, hidden)`, the chosen experts
    `(tokens, top_k)` and their routing weights `(tokens, top_k)` -> `(tokens, hidden)`. `layout`: how
    the family's fused tensors hold them."""

    def __init__(self, experts: list[Expert], layout: FusedLayout = FusedLayout()):
        super().__init__(experts)
        self.layout = layout
        self.all_tokens = False
        self.routed_tokens = torch.zeros(len(experts), dtype=torch.long)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        counts = torch.bincount(top_k_index.reshape(-1), minlength=len(self))[:len(self)]
        self.routed_tokens = self.routed_tokens.to(counts.device) + counts
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)  # (routed,) each
            if self.all_tokens:
                y = expert(hidden_states)[token]  # the observers see every token; the output only the routed
            elif len(token):
                y = expert(hidden_states[token])
            else:
                continue
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _is_fused(module: nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, torch.Tensor) and p.dim() == 3 and getattr(module, "down_proj", None) is not None \
        and getattr(module, "has_gate", True) and not getattr(module, "has_post_expert_norm", False)


def _gate_function(fused: nn.Module):
    """None for act(gate) * up; else the family's own `_apply_gate` (gpt_oss clamps gate and up and computes
    (up + 1) * gate * sigmoid(alpha * gate)), bound to the fused module's settings without its weights."""
    from transformers.integrations import moe

    own = getattr(type(fused), "_apply_gate", None)
    if own is None or own is getattr(moe, "_default_apply_gate", None):
        return None
    settings = {k: v for k, v in vars(fused).items() if not k.startswith("_")}
    settings.update(fused._modules)  # act_fn
    return partial(own, SimpleNamespace(**settings))


@torch.no_grad()
def unfuse_experts_(model: nn.Module, arch) -> nn.Module:
    """Replace every block's fused experts (`arch.experts`) by `Experts`, copying the weights (or
    keeping meta tensors meta). Does nothing for a dense model or one already unfused."""
    if arch.experts is None:
        return model
    for i, block in enumerate(model.get_submodule(arch.blocks)):
        if i in arch.dense_blocks:
            continue
        try:
            fused = block.get_submodule(arch.experts)
        except AttributeError:
            raise LiteError(f"{arch.blocks}.{i} has no {arch.experts}, though its config makes it a MoE block; the "
                            "lite record for this model_type does not fit the model") from None
        if isinstance(fused, Experts):
            continue
        if not _is_fused(fused):
            raise LiteError(f"{arch.blocks}.{i}.{arch.experts} is not a transformers fused-experts module "
                            "(gate_up_proj, down_proj); the lite record for this model_type does not fit it")
        layout = FusedLayout(transposed=getattr(fused, "is_transposed", False),
                             interleaved=not getattr(fused, "is_concatenated", True))
        bias = getattr(fused, "has_bias", False)
        first = layout.take(fused.gate_up_proj, 0, "gate_proj", False)  # (I, H)
        inter, hidden = first.shape
        apply_gate, act_fn = _gate_function(fused), getattr(fused, "act_fn", None)
        experts = []
        for e in range(fused.gate_up_proj.shape[0]):
            expert = Expert(hidden, inter, act_fn, first.dtype, first.device, bias, apply_gate, layout.interleaved)
            if first.device.type != "meta":
                for proj in PROJECTIONS:
                    name, linear = "down_proj" if proj == "down_proj" else "gate_up_proj", expert.get_submodule(proj)
                    linear.weight.copy_(layout.take(getattr(fused, name), e, proj, False))
                    if bias:
                        linear.bias.copy_(layout.take(getattr(fused, name + "_bias"), e, proj, True))
            experts.append(expert.requires_grad_(False))
        block.set_submodule(arch.experts, Experts(experts, layout))
    return model


def experts_of(block: nn.Module, arch) -> Experts | None:
    return block.get_submodule(arch.experts) if arch.experts is not None else None


@contextmanager
def every_expert_sees_all_tokens(block: nn.Module, arch, on: bool = True):
    """While inside, each expert of `block` runs on every token (its observers see them all); the output
    is unchanged. Resets the routed-token counts on entry."""
    experts = experts_of(block, arch)
    if experts is None:
        yield None
        return
    experts.routed_tokens.zero_()
    experts.all_tokens = on
    try:
        yield experts
    finally:
        experts.all_tokens = False


def describe_routing(prefix: str, counts: torch.Tensor) -> str:
    """One line: how the calibration tokens spread over a block's experts."""
    c = counts.float()
    idle = [str(e) for e in (counts == 0).nonzero().flatten().tolist()]
    line = (f"{prefix}: routed tokens per expert min {int(c.min())}, median {int(c.median())}, "
            f"max {int(c.max())}")
    return line + (f"; never routed: expert {', '.join(idle[:8])}{' ...' if len(idle) > 8 else ''}" if idle else "")
