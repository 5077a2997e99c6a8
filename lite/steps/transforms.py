"""Model-preparation steps: exact transforms of a model in memory (in fp32), applied before calibration.

- `fuse_norms`: each norm's weight (Gemma's `1 + w`) multiplied into the input columns of the linears
  that read it (the final norm's into `lm_head`), the norm left computing `x / rms(x)`. Tied embeddings
  are untied first when the final norm's weight is not all ones (lm_head then differs from them).
- `rotate`: the residual stream rotated by one orthogonal Q (a randomized Hadamard matrix when the
  hidden size is a power of two, else a random orthogonal one, from `seed`): the embeddings and the
  linears that write the residual stream (`residual_writers`: rows, and biases) get Q, the linears that
  read it (the norms' linears, `lm_head`: input columns) get it too, so that x·Q flows through the
  blocks and Q·Qᵀ = I cancels at every reader. A norm computing `x / rms(x)` commutes with Q (rms is
  rotation-invariant), which is why `fuse_norms` must come first. Rotation spreads outlier channels
  over all channels, which is what per-tensor activation scales need.
- `center_embeddings`: each embedding row minus its mean. This leaves the model's function unchanged
  only in front of a mean-subtracting norm (LayerNorm); every supported family uses RMSNorm, where it
  changes the output, so the step refuses unless `force=True`.

In a recipe they come first, and run as their own weight-only sweep before the calibration sweep.
"""

import math

import torch

from lite.archs import NormPair
from lite.errors import LiteError
from lite.steps.base import Block, Step


def _norm_gain(norm, offset: float) -> torch.Tensor:
    """The effective per-channel gain of an RMSNorm, `offset + w`, in float64."""
    return norm.weight.detach().double() + offset


def _set_identity_(norm, offset: float) -> None:
    with torch.no_grad():
        norm.weight.fill_(1.0 - offset)


def _scale_columns_(linear, gain: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_((linear.weight.double() * gain).to(linear.weight.dtype))  # (out, in) * (in,)


class FuseNorms(Step):
    def start(self, run) -> None:
        model, arch = run.source.model, run.source.arch
        self.model, self.arch = model, arch
        if arch.layer_norm:
            raise LiteError(f"fuse_norms needs RMSNorm norms; {model.config.model_type} uses LayerNorm (mean "
                            "subtraction, a bias), whose weight does not move into the linears exactly: leave it out")
        final = model.get_submodule(arch.final_norm)
        head = model.get_submodule(arch.lm_head)
        gain = _norm_gain(final, arch.norm_offset)
        if head.weight is model.get_submodule(arch.embed).weight and not torch.all(gain == 1):
            untie_(model, arch)
            head = model.get_submodule(arch.lm_head)
        _scale_columns_(head, gain)
        _set_identity_(final, arch.norm_offset)

    def prepare_(self, block: Block) -> None:
        for pair in block.arch.norm_pairs:
            fuse_pair_(block.module, pair, block.arch.norm_offset)


def fuse_pair_(block, pair: NormPair, offset: float) -> None:
    norm = block.get_submodule(pair.norm)
    gain = _norm_gain(norm, offset)
    for name in pair.linears:
        _scale_columns_(block.get_submodule(name), gain)
    _set_identity_(norm, offset)


def untie_(model, arch) -> None:
    """Give `lm_head` its own copy of the embedding matrix."""
    head = model.get_submodule(arch.lm_head)
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n (a power of two), entries ±1, float64."""
    assert n > 0 and n & (n - 1) == 0, f"Hadamard order must be a power of two, got {n}"
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(Q `(n, n)` orthogonal float64, its kind): H·diag(±1)/√n for a power-of-two n, else the Q of a
    Gaussian matrix's QR (signs fixed so that it is unique for the seed)."""
    g = torch.Generator().manual_seed(seed)
    if n & (n - 1) == 0:
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return hadamard(n) * signs / math.sqrt(n), "randomized-hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), "random-orthogonal"


class Rotate(Step):
    """Rotate the residual stream (see the module doc); `self.record` says which Q was used."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.record = {}

    def start(self, run) -> None:
        model, arch = run.source.model, run.source.arch
        self.model, self.arch = model, arch
        if not arch.rotatable:
            raise LiteError(f"rotate is not exact on {model.config.model_type}: norms after the attention or MLP "
                            "output, or LayerNorm's mean subtraction, do not commute with a rotation; leave it out")
        final = model.get_submodule(arch.final_norm)
        if not torch.all(_norm_gain(final, arch.norm_offset) == 1):
            raise LiteError("rotate needs fuse_norms before it (the norms must compute x / rms(x)); put fuse_norms "
                            "first in the recipe")
        self.q, kind = rotation(model.config.hidden_size, self.seed)
        self.record = {"kind": kind, "seed": self.seed, "size": model.config.hidden_size}
        embed = model.get_submodule(arch.embed)
        head = model.get_submodule(arch.lm_head)
        if head.weight is embed.weight:
            untie_(model, arch)
            head = model.get_submodule(arch.lm_head)
        with torch.no_grad():
            embed.weight.copy_((embed.weight.double() @ self.q).to(embed.weight.dtype))  # (vocab, hidden)
            head.weight.copy_((head.weight.double() @ self.q).to(head.weight.dtype))  # reads the residual

    def prepare_(self, block: Block) -> None:
        q = self.q.to(next(block.module.parameters()).device)
        for pair in block.arch.norm_pairs:
            if not torch.all(_norm_gain(block.module.get_submodule(pair.norm), block.arch.norm_offset) == 1):
                raise LiteError(f"rotate needs fuse_norms before it: {block.prefix}.{pair.norm} still has its "
                                "weight; put fuse_norms first in the recipe")
        with torch.no_grad():
            for pair in block.arch.norm_pairs:  # readers: input columns
                for name in pair.linears:
                    w = block.module.get_submodule(name).weight
                    w.copy_((w.double() @ q).to(w.dtype))
            for name in block.arch.residual_writers:  # writers: output rows (and bias)
                linear = block.module.get_submodule(name)
                linear.weight.copy_((q.T @ linear.weight.double()).to(linear.weight.dtype))
                if linear.bias is not None:
                    linear.bias.copy_((linear.bias.double() @ q).to(linear.bias.dtype))


class CenterEmbeddings(Step):
    def __init__(self, force: bool = False):
        self.force = force

    def start(self, run) -> None:
        if not self.force:
            raise LiteError("center_embeddings changes the output of models with RMSNorm (every supported family); "
                            "it is exact only in front of LayerNorm. Pass force: true to apply it anyway")
        embed = run.source.model.get_submodule(run.source.arch.embed)
        with torch.no_grad():
            embed.weight.sub_(embed.weight.mean(dim=1, keepdim=True))


@torch.no_grad()
def transform_(model, steps: list[Step]) -> None:
    """Apply transform steps to a model in memory, block by block, through the sweep (no calibration data)."""
    from lite.archs import arch_for
    from lite.source import Loaded
    from lite.sweep import sweep

    sweep(Loaded(model, arch_for(model.config)), steps, None, device="cpu", progress=False)
