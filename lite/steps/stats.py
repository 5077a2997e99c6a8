"""`statistics`: per-channel activation statistics of every quantized linear's input and output and of
the norms feeding them, in lmdeploy's layout (`inputs_stats.pth`, `outputs_stats.pth`); for a MoE model
also the tokens routing sent each expert of each block (`routed_tokens.pth`)."""

import torch

from lite.archs import quantized_linears
from lite.calibrate import STATS, RunningStats, store_statistics
from lite.errors import warn
from lite.moe import experts_of
from lite.steps.base import Block, Hook, Step

INPUTS_STATS, OUTPUTS_STATS = "inputs_stats.pth", "outputs_stats.pth"
# MoE models: `{block fqn: int64 (experts,)}`, the calibration tokens the model's routing sent each expert.
ROUTED_TOKENS = "routed_tokens.pth"


class Statistics(Step):
    """`{stat: {fqn: fp32 tensor[channels]}}` over all calibration tokens; leaves each block's input
    absmax on `block.absmax` for the steps after it."""

    # `RunningStats` reduces each activation in its own dtype (aminmax, sums with an fp32 accumulator): no
    # copy; measured on an H200, its three reductions of a (8192, 14336) bf16 tensor take 0.24 ms, about
    # three reads of it
    activation_copy_bytes = 0

    def __init__(self):
        self.inputs = {k: {} for k in STATS}
        self.outputs = {k: {} for k in STATS}
        self.routed = {}
        self._observed = None

    def observers(self, block: Block) -> list[Hook]:
        """A norm's output is the input of the linears it feeds (q/k/v, gate/up): one observer serves both."""
        prefix, arch = block.prefix, block.arch
        linears = quantized_linears(arch, block.module)
        observed_in, observed_out, hooks, shared = {}, {}, [], set()
        for pair in arch.norm_pairs:
            stats = observed_out[f"{prefix}.{pair.norm}"] = RunningStats()
            hooks.append(Hook(pair.norm, "output", stats))
            for name in [n for n in pair.linears if n in linears]:  # in table order: the same bytes every run
                observed_in[f"{prefix}.{name}"] = stats
                shared.add(name)
        for name in linears:
            if name not in shared:
                observed_in[f"{prefix}.{name}"] = RunningStats()
                hooks.append(Hook(name, "input", observed_in[f"{prefix}.{name}"]))
            observed_out[f"{prefix}.{name}"] = RunningStats()
            hooks.append(Hook(name, "output", observed_out[f"{prefix}.{name}"]))
        self._observed = observed_in, observed_out
        return hooks

    def apply_(self, block: Block) -> None:
        observed_in, observed_out = self._observed
        unseen = sorted({fqn.rpartition(".")[0] for fqn, stats in observed_in.items() if stats.count == 0})
        if unseen:  # MoE experts that routing sent no token (--moe-calibrate-all-experts false)
            warn(f"no calibration token reached {', '.join(unseen)}: no statistics for them, so they are not "
                 "smoothed (--moe-calibrate-all-experts true gives every expert every token)")
            observed_in = {fqn: stats for fqn, stats in observed_in.items() if stats.count}
            observed_out = {fqn: stats for fqn, stats in observed_out.items() if stats.count}
        experts = experts_of(block.module, block.arch)
        if experts is not None:  # counted in the forward just observed
            self.routed[block.prefix] = experts.routed_tokens.cpu().clone()
        block.absmax = {fqn: stats.absmax for fqn, stats in observed_in.items()}
        store_statistics(observed_in, observed_out, self.inputs, self.outputs)
        self._observed = None

    def artifacts(self) -> dict:
        routed = {ROUTED_TOKENS: self.routed} if self.routed else {}
        return {INPUTS_STATS: self.inputs, OUTPUTS_STATS: self.outputs, **routed}


@torch.no_grad()
def collect_statistics(model, arch, tokens: torch.Tensor, batch_size: int, device, progress: bool = True,
                       all_experts: bool = True):
    """(inputs_stats, outputs_stats) of a model in memory, through the sweep."""
    from lite.source import Loaded
    from lite.sweep import sweep

    step = Statistics()
    sweep(Loaded(model, arch), [step], tokens, batch_size=batch_size, device=device, progress=progress,
          all_experts=all_experts)
    return step.inputs, step.outputs
