"""Static activation scales: observers see every calibration token, percentile and mse never widen the
minmax range, linears reading one tensor share one scale, and QLinear applies a static scale."""

import pytest
import torch

from helpers import logits, random_tokens
from lite.archs import ARCHS
from lite.errors import LiteError
from lite.model import build_tiny
from lite.observers import ActSettings, MinMax, Mse, Percentile, input_groups, mse_range
from lite.steps.static_scales import static_input_scales
from lite.qmodules import QLinear
from lite.quant import QMAX

INT8 = torch.int8


def scales_of(model, tokens, observer="minmax", batch_size=2, **kw):
    settings = ActSettings("static", observer, **kw)
    return static_input_scales(model, ARCHS["llama"], tokens, batch_size, "cpu", settings, INT8, progress=False)


def test_minmax_keeps_the_largest_value_of_any_batch():
    observer = MinMax(INT8)
    for peak in (50.0, 1.0, 2.0):  # the largest value comes first
        observer.update(torch.tensor([[peak, -0.5], [0.25, 0.0]]))
    assert observer.result().item() == 50.0


def test_the_pass_sees_the_first_batch_when_it_holds_the_largest_activation():
    model = build_tiny("llama")
    # Token 7's embedding becomes one channel, which RMSNorm turns into sqrt(64) = 8 times the norm
    # weight, against |x| ~ 3 for the other tokens: a far larger input to layer 0's q/k/v.
    spike = 7
    with torch.no_grad():
        model.model.embed_tokens.weight[spike] = 0.0
        model.model.embed_tokens.weight[spike, 3] = 1.0
        model.model.layers[0].input_layernorm.weight[3] = 10.0
    first = random_tokens(batch=2, seed=1)
    first[0, 5] = spike
    rest = random_tokens(batch=4, seed=2)
    rest[rest == spike] = 8
    q = "model.layers.0.self_attn.q_proj"
    all_batches = scales_of(model, torch.cat([first, rest]))[q]
    assert all_batches.item() == scales_of(model, first)[q].item()
    assert all_batches.item() > scales_of(model, rest)[q].item()
    # and it equals max |x| over every token of every batch, divided by 127
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    logits(model, torch.cat([first, rest]))
    hook.remove()
    assert torch.allclose(all_batches, torch.stack(seen).max() / QMAX[INT8])


def heavy_tailed(n=100_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:: 997] *= 40.0  # sparse outliers, as in LLM activations
    return x.reshape(-1, 100)  # (tokens, channels)


@pytest.mark.parametrize("make", [lambda: Percentile(INT8, 99.9), lambda: Mse(INT8)])
def test_percentile_and_mse_are_no_wider_than_minmax(make):
    data = heavy_tailed()
    observer, minmax = make(), MinMax(INT8)
    for batch in data.split(100):
        observer.update(batch)
        minmax.update(batch)
    assert 0 < observer.result().item() < minmax.result().item()


def test_percentile_and_mse_are_no_wider_than_minmax_on_a_model():
    model, tokens = build_tiny("llama"), random_tokens(batch=4, seqlen=64)
    minmax = scales_of(model, tokens)
    for observer in ("percentile", "mse"):
        other = scales_of(model, tokens, observer)
        assert other.keys() == minmax.keys()
        assert all(other[k].item() <= minmax[k].item() for k in minmax), observer


def test_percentile_100_is_minmax():
    data = heavy_tailed()
    observer = Percentile(INT8, 100.0)
    observer.update(data)
    assert observer.result().item() == data.abs().max().item()


def test_mse_picks_the_clip_with_the_smallest_error():
    values = heavy_tailed().abs().reshape(-1)
    absmax = values.max()
    chosen = mse_range(values, absmax, INT8)

    def error(r):
        scale = r / 127
        return ((values / scale).round().clamp(-128, 127) * scale - values).pow(2).mean()

    assert error(chosen) <= error(absmax) and error(chosen) <= error(absmax * 0.5)


def test_the_sample_is_bounded_and_drawn_from_every_batch():
    observer = Percentile(INT8, 50.0, size=1000)
    for i in range(10):
        observer.update(torch.full((500,), float(i + 1)))
    assert observer.values.numel() == 1000
    counts = torch.bincount(observer.values.long(), minlength=11)[1:]
    assert (counts > 50).all(), counts  # about 100 of each batch's value


def test_shared_input_linears_share_the_scale():
    model = build_tiny("llama")
    scales = scales_of(model, random_tokens())
    groups = input_groups(ARCHS["llama"], model.model.layers[0])
    assert groups == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                      ("self_attn.o_proj",), ("mlp.down_proj",)]
    for i in range(2):
        p = f"model.layers.{i}"
        q = scales[f"{p}.self_attn.q_proj"]
        assert torch.equal(q, scales[f"{p}.self_attn.k_proj"]) and torch.equal(q, scales[f"{p}.self_attn.v_proj"])
        assert torch.equal(scales[f"{p}.mlp.gate_proj"], scales[f"{p}.mlp.up_proj"])
        assert not torch.equal(scales[f"{p}.mlp.down_proj"], scales[f"{p}.mlp.up_proj"])


def test_qlinear_with_a_static_scale_quantizes_per_tensor():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(3, 5, 16)
    s = torch.tensor([0.02])
    q = QLinear.from_linear(linear, INT8, input_scale=s)
    xq = (x / s).round().clamp(-128, 127)
    expected = (xq * s) @ q.dequantized_weight().T + linear.bias
    assert torch.allclose(q(x), expected, atol=1e-5)
    assert "input_scale" in q.state_dict() and "input_scale" not in QLinear.from_linear(linear, INT8).state_dict()


def test_act_settings_check_their_values():
    with pytest.raises(LiteError, match="dynamic, static"):
        ActSettings("per-tensor")
    with pytest.raises(LiteError, match="minmax, percentile, mse"):
        ActSettings("static", "kl")
    with pytest.raises(LiteError, match="act-percentile"):
        ActSettings("static", "percentile", 120.0)


@pytest.mark.parametrize("kind", ["minmax", "percentile", "mse", "running_stats"])
def test_observers_of_disjoint_data_merge_into_the_observer_of_all_of_it(kind):
    """What several GPUs need: each sees part of the tokens, the merged result is the single-observer one."""
    from lite.calibrate import RunningStats
    from lite.observers import OBSERVERS

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(4, 16, 32, generator=g) * (1 + i) for i in range(3)]  # (batch, seq, channels)
    make = (lambda seed: RunningStats()) if kind == "running_stats" else (
        lambda seed: OBSERVERS[kind](torch.int8, **({} if kind == "minmax" else {"size": 10**6, "seed": seed})))
    whole = make(0)
    for x in parts:
        whole.update(x)
    split = [make(i + 1) for i in range(len(parts))]
    for observer, x in zip(split, parts):
        observer.update(x)
    merged = make(9)
    for observer in split:
        merged.merge(observer)

    a, b = whole.result(), merged.result()
    if kind == "running_stats":
        for stat in a:
            assert torch.allclose(a[stat], b[stat], rtol=1e-6, atol=1e-6), stat
    else:  # the sample holds every value here (size > data), so the result is exact
        assert torch.equal(a, b)
    # Negative control: one part alone does not give the whole result.
    alone = split[0].result()
    assert not (torch.allclose(alone["absmax"], a["absmax"]) if kind == "running_stats" else torch.equal(alone, a))
