"""Model-preparation transforms keep the fp32 model's function exactly, on every supported family."""

import copy

import pytest
import torch

from helpers import logits, random_tokens, relative_difference
from lite.archs import arch_for
from lite.errors import LiteError
from lite.model import build_tiny
from lite.steps.transforms import CenterEmbeddings, FuseNorms, Rotate, rotation, transform_

EXACT = 1e-5  # relative to the largest logit: fp32 reordering noise


def untied(model_type, **overrides):
    return build_tiny(model_type, **overrides)


@pytest.mark.parametrize("steps", [["fuse"], ["fuse", "rotate"]], ids=["fuse_norms", "fuse_norms+rotate"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transforms_keep_the_logits(model_type, steps, tied):
    model = build_tiny(model_type, tie_word_embeddings=tied)
    arch = arch_for(model.config)
    tokens = random_tokens()
    before = logits(model, tokens)
    transforms = [FuseNorms() if s == "fuse" else Rotate(seed=3) for s in steps]
    if arch.layer_norm or ("rotate" in steps and not arch.rotatable):  # not exact there: refused
        with pytest.raises(LiteError, match="fuse_norms needs RMSNorm|rotate is not exact"):
            transform_(model, transforms)
        return

    transform_(model, transforms)

    assert relative_difference(logits(model, tokens), before) <= EXACT
    norm = model.get_submodule(arch.final_norm).weight
    assert torch.all(norm == 1.0 - arch.norm_offset)  # the gain went into lm_head
    if "rotate" in steps:
        embed, head = model.get_submodule("model.embed_tokens").weight, model.get_submodule("lm_head").weight
        assert embed is not head  # rotation unties: the embeddings turn by Q, lm_head's columns too


def test_rotation_with_a_hidden_size_that_is_not_a_power_of_two():
    model = build_tiny("llama", hidden_size=48, head_dim=6)
    tokens = random_tokens()
    before = logits(model, tokens)
    rotate = Rotate(seed=1)

    transform_(model, [FuseNorms(), rotate])

    assert rotate.record == {"kind": "random-orthogonal", "seed": 1, "size": 48}
    assert relative_difference(logits(model, tokens), before) <= EXACT


@pytest.mark.parametrize("n", [8, 64, 48])
def test_rotation_is_orthogonal_and_seeded(n):
    q, _ = rotation(n, seed=5)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation(n, seed=5)[0]) and not torch.equal(q, rotation(n, seed=6)[0])


def test_negative_controls_a_wrong_factor_changes_the_logits():
    """The tests above could not pass by doing nothing: each transform changes the weights, and a
    rotation applied to the readers but not to the writers (or the embeddings) breaks the model."""
    model = build_tiny("llama")
    tokens = random_tokens()
    before = logits(model, tokens)
    rotated = copy.deepcopy(model)
    transform_(rotated, [FuseNorms(), Rotate(seed=3)])
    assert not torch.equal(rotated.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)

    broken = copy.deepcopy(model)
    broken.config.tie_word_embeddings = False
    arch_writers = Rotate.prepare_

    def readers_only(self, block):
        saved = block.arch.residual_writers
        object.__setattr__(block.arch, "residual_writers", ())
        try:
            arch_writers(self, block)
        finally:
            object.__setattr__(block.arch, "residual_writers", saved)

    Rotate.prepare_ = readers_only
    try:
        transform_(broken, [FuseNorms(), Rotate(seed=3)])
    finally:
        Rotate.prepare_ = arch_writers
    assert relative_difference(logits(broken, tokens), before) > 0.05


def test_rotate_without_fuse_norms_and_center_embeddings_on_rmsnorm_are_refused():
    model = build_tiny("llama")
    with pytest.raises(LiteError, match="fuse_norms before it"):
        transform_(model, [Rotate()])
    with pytest.raises(LiteError, match="exact only in front of LayerNorm"):
        transform_(build_tiny("llama"), [CenterEmbeddings()])
    forced = build_tiny("llama")
    transform_(forced, [CenterEmbeddings(force=True)])
    assert torch.allclose(forced.model.embed_tokens.weight.mean(dim=1), torch.zeros(258), atol=1e-6)
