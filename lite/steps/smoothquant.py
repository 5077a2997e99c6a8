"""`smoothquant`: migration scales s = max|X|^alpha / w^(1-alpha) for every smoothing pair of a block
(Xiao et al. 2023; the weight statistic w as `lite.smooth.weight_statistic`), left on `block.scales`
for the quantizing step, which folds them into the producers or stores them on the QLinears."""

from lite.archs import quantized_linears
from lite.smooth import fold_scales_, migration_scales
from lite.steps.base import Block, Step

SCALES = "migration_scales.pth"


class SmoothQuant(Step):
    """From the statistics step's `block.absmax` (one pass), from `act_absmax` (`{linear fqn: max|X|}`,
    statistics made earlier), or with `scales` given (`{consumer fqn: s}`, nothing computed). With
    `fold`, given scales are folded into the norms and producers before the block is observed, computed
    ones as soon as they are computed (so that static scales, on the sweep's second chain, see the
    smoothed inputs); otherwise the quantizing step folds or stores them."""

    activation_copy_bytes = 0  # observes nothing

    def __init__(self, alpha: float = 0.3, w_stat: str = "lmdeploy", act_absmax: dict | None = None,
                 scales: dict | None = None, fold: bool = False):
        self.alpha, self.w_stat, self.act_absmax, self.given = float(alpha), w_stat, act_absmax, scales
        self.fold = fold
        self.found = {}

    def _given_for(self, block: Block) -> dict:
        device = next(block.module.parameters()).device
        return {fqn: s.to(device) for fqn, s in self.given.items() if fqn.startswith(block.prefix + ".")}

    def prepare_(self, block: Block) -> None:
        if self.fold and self.given is not None:
            fold_scales_(block.module, block.prefix, block.arch, block.config, self._given_for(block))

    def apply_(self, block: Block) -> None:
        if self.given is not None:
            block.scales = {} if self.fold else self._given_for(block)
            return
        device = next(block.module.parameters()).device
        if self.act_absmax is None:
            absmax = block.absmax
        else:
            absmax = {f"{block.prefix}.{n}": self.act_absmax[f"{block.prefix}.{n}"].to(device)
                      for n in quantized_linears(block.arch, block.module)}
        block.scales = migration_scales({block.prefix: block.module}, block.arch, block.config, absmax, self.alpha,
                                        self.w_stat)
        self.found.update({fqn: s.cpu() for fqn, s in block.scales.items()})
        if self.fold:
            fold_scales_(block.module, block.prefix, block.arch, block.config, block.scales)
            block.scales = {}

    def artifacts(self) -> dict:
        return {} if self.given is not None else {SCALES: self.found}
