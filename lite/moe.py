"""Mixture-of-Experts layers with one `nn.Linear` per expert.

transformers 5 holds a MoE layer's experts as two fused 3-D parameters, `experts.gate_up_proj`
`(E, 2I, H)` (gate rows first, then up) and `experts.down_proj` `(E, H, I)`, while checkpoints store
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

import torch
import torch.nn as nn

from lite.errors import LiteError


class Expert(nn.Module):
    """One expert's MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype, device):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.ModuleList):
    """Per-expert MLPs called like transformers' fused experts: `(tokens, hidden)`, the chosen experts
    `(tokens, top_k)` and their routing weights `(tokens, top_k)` -> `(tokens, hidden)`."""

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
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
    return isinstance(p, torch.Tensor) and p.dim() == 3 and getattr(module, "down_proj", None) is not None


@torch.no_grad()
def unfuse_experts_(model: nn.Module, arch) -> nn.Module:
    """Replace every block's fused experts (`arch.experts`) by `Experts`, copying the weights (or
    keeping meta tensors meta). Does nothing for a dense model or one already unfused."""
    if arch.experts is None:
        return model
    for i, block in enumerate(model.get_submodule(arch.blocks)):
        try:
            fused = block.get_submodule(arch.experts)
        except AttributeError:
            raise LiteError(f"{arch.blocks}.{i} has no {arch.experts}: lite quantizes MoE models whose every "
                            "layer is a MoE layer (set mlp_only_layers=[] and decoder_sparse_step=1)") from None
        if isinstance(fused, Experts):
            continue
        if not _is_fused(fused):
            raise LiteError(f"{arch.blocks}.{i}.{arch.experts} is not a transformers fused-experts module "
                            "(gate_up_proj, down_proj); the lite record for this model_type does not fit it")
        gate_up, down = fused.gate_up_proj, fused.down_proj  # (E, 2I, H), (E, H, I)
        n, two_i, hidden = gate_up.shape
        inter = two_i // 2
        experts = []
        for e in range(n):
            expert = Expert(hidden, inter, fused.act_fn, gate_up.dtype, gate_up.device)
            if gate_up.device.type != "meta":
                expert.gate_proj.weight.copy_(gate_up[e, :inter])
                expert.up_proj.weight.copy_(gate_up[e, inter:])
                expert.down_proj.weight.copy_(down[e])
            experts.append(expert.requires_grad_(False))
        block.set_submodule(arch.experts, Experts(experts))
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
