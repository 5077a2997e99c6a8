"""The one block loop: the step lifecycle, hooks frozen after each block (also on errors), the registry."""

import pytest
import torch

from helpers import arch_of, random_tokens
from lite.errors import LiteError
from lite.model import build_tiny
from lite.source import Loaded
from lite.steps import STEPS, Hook, Step, create, register
from lite.sweep import sweep


class Recorder(Step):
    """Logs every lifecycle call; observes one linear's input (so that the block runs forward)."""

    def __init__(self, name, log, fail_at=None):
        self.name, self.log, self.fail_at = name, log, fail_at
        self.seen = 0

    def start(self, run):
        self.log.append((self.name, "start"))

    def prepare_(self, block):
        self.log.append((self.name, "prepare_", block.index))

    def observers(self, block):
        self.log.append((self.name, "observers", block.index))
        step = self

        class Count:
            def update(self, x):
                step.seen += x.shape[0] * x.shape[1]
                if step.fail_at == ("update", block.index):
                    raise RuntimeError("observer failed")

        return [Hook("mlp.down_proj", "input", Count())]

    def apply_(self, block):
        self.log.append((self.name, "apply_", block.index))
        if self.fail_at == ("apply_", block.index):
            raise RuntimeError("step failed")

    def end(self, run):
        self.log.append((self.name, "end"))

    def artifacts(self):
        self.log.append((self.name, "artifacts"))
        return {}


def test_lifecycle_order_is_start_then_each_block_in_recipe_order_then_end_and_artifacts():
    model, log = build_tiny("llama", num_hidden_layers=3), []
    steps = [Recorder("a", log), Recorder("b", log)]

    sweep(Loaded(model, arch_of(model)), steps, random_tokens(2, 8), batch_size=1, device="cpu", progress=False)
    for step in steps:
        step.artifacts()  # asked for by the stage once the sweep is done

    per_block = [x for i in range(3) for x in [("a", "prepare_", i), ("b", "prepare_", i), ("a", "observers", i),
                                                ("b", "observers", i), ("a", "apply_", i), ("b", "apply_", i)]]
    assert log == [("a", "start"), ("b", "start"), *per_block, ("a", "end"), ("b", "end"),
                   ("a", "artifacts"), ("b", "artifacts")]
    assert steps[0].seen == 3 * 2 * 8  # every token through every block's down_proj


@pytest.mark.parametrize("fail_at", [("update", 1), ("apply_", 1)])
def test_hooks_are_removed_after_each_block_also_when_a_step_raises(fail_at):
    model, log = build_tiny("llama", num_hidden_layers=3), []

    with pytest.raises(RuntimeError, match="failed"):
        sweep(Loaded(model, arch_of(model)), [Recorder("a", log, fail_at)], random_tokens(2, 8), batch_size=1,
              device="cpu", progress=False)

    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert ("a", "end") not in log
    # The model is still whole and usable.
    assert torch.isfinite(model(input_ids=random_tokens(1, 8)).logits).all()


def test_registry_creates_by_name_and_refuses_what_is_not_a_step():
    assert {"statistics", "smoothquant", "rtn", "gptq", "awq"} <= set(STEPS)
    assert type(create("smoothquant", alpha=0.5)).__name__ == "SmoothQuant"
    with pytest.raises(LiteError, match="unknown step 'spqr'.*registered steps: .*rtn.*smoothquant.*statistics"):
        create("spqr")
    with pytest.raises(LiteError, match="must be a subclass of lite.steps.Step"):
        register("mine", object)

    class Mine(Step):
        pass

    try:
        register("mine", Mine)
        assert isinstance(create("mine"), Mine)
    finally:
        STEPS.pop("mine", None)


@pytest.mark.parametrize("model_type, overrides", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    ("granite_swa", dict(sliding_window=4)),
    ("cwm", dict(sliding_window=4)),
])
def test_every_block_gets_the_attention_mask_of_its_own_layer_type(model_type, overrides):
    """A model mixing full and sliding-window layers (issue 11): each block is calibrated with the mask the
    model's own forward gives it, so statistics equal those of hooks on the whole model's forward."""
    from helpers import random_tokens
    from lite.steps.stats import collect_statistics

    model = build_tiny(model_type, **overrides)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    tokens = random_tokens(2, 32)
    arch = arch_of(model)
    reference, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            def hook(m, args, out, name=name):
                reference[name] = args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    inputs, _ = collect_statistics(model, arch, tokens, batch_size=2, device="cpu", progress=False)
    assert set(reference) <= set(inputs["absmax"])
    for fqn, expected in reference.items():
        assert torch.allclose(inputs["absmax"][fqn], expected, rtol=1e-5, atol=1e-6), fqn
    # The control: the sliding layer's o_proj input differs from what full attention would give it.
    full = build_tiny(model_type, **{**overrides, "sliding_window": 4096})
    with torch.no_grad():
        seen = {}
        handle = full.model.layers[1].self_attn.o_proj.register_forward_hook(
            lambda m, a, o: seen.update(x=a[0].reshape(-1, a[0].shape[-1]).abs().amax(dim=0)))
        full(input_ids=tokens, use_cache=False)
        handle.remove()
    assert not torch.allclose(seen["x"], reference["model.layers.1.self_attn.o_proj"], rtol=1e-3)
