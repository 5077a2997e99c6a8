"""`--alpha auto`: each block's alpha must be the one whose quantized model has the lowest next-token
loss on the calibration windows, measured here by an independent path (the whole quantized model's
forward, as exported), not by the search's own block-by-block runner."""

import json

import pytest
import torch

from helpers import arch_of, blocks_of, logits, random_tokens, tiny_absmax
from lite import compressed_tensors
from lite.cli.main import main
from lite.model import build_tiny
from lite.observers import ActSettings
from lite.steps.alpha_search import search_alphas
from lite.smooth import migration_scales

GRID = (0.0, 0.5, 1.0)


def kl_from(reference, model, tokens) -> float:
    """Summed KL(P_reference || Q_model) over every position but the last, written out with probabilities."""
    p = torch.softmax(logits(reference, tokens)[:, :-1].double(), dim=-1)
    q = torch.softmax(logits(model, tokens)[:, :-1].double(), dim=-1)
    return (p * (p.log() - q.log())).sum().item()


def scales_at(model, absmax, alphas: dict[str, float], w_stat: str) -> dict:
    scales = {}
    for prefix, block in blocks_of(model).items():
        if prefix in alphas:
            scales.update(migration_scales({prefix: block}, arch_of(model), model.config, absmax, alphas[prefix], w_stat))
    return scales


def quantized_loss(model_type, tokens, absmax, alphas, w_stat, quant_dtype) -> float:
    """KL from the float model of the model with the blocks in `alphas` smoothed and quantized and the
    others left float."""
    model, float_model = build_tiny(model_type), build_tiny(model_type)
    compressed_tensors.quantize_model_(model, quant_dtype, scales_at(model, absmax, alphas, w_stat), ActSettings(),
                                       progress=False)
    for index, prefix in enumerate(blocks_of(float_model)):  # put back the blocks not yet chosen, in float
        if prefix not in alphas:
            model.model.layers[index] = float_model.model.layers[index]
    return kl_from(float_model, model, tokens)


@pytest.mark.parametrize("model_type,w_stat,quant_dtype", [("llama", "lmdeploy", "fp8"), ("qwen2", "absmax", "int8")])
def test_each_block_gets_the_alpha_closest_to_the_float_model(model_type, w_stat, quant_dtype):
    tokens = random_tokens(batch=4, seqlen=32)
    absmax = tiny_absmax(model_type)
    model = build_tiny(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scales, chosen = search_alphas(model, arch_of(model), absmax, w_stat, quant_dtype, tokens, 2, "cpu",
                                   progress=False, grid=GRID)

    first, last = list(blocks_of(model))  # tiny models have two blocks
    # Block 0 is chosen with block 1 still float; block 1 with block 0 at its chosen alpha.
    losses_first = {a: quantized_loss(model_type, tokens, absmax, {first: a}, w_stat, quant_dtype) for a in GRID}
    losses_last = {a: quantized_loss(model_type, tokens, absmax, {first: chosen[first], last: a}, w_stat, quant_dtype)
                   for a in GRID}
    assert len(set(losses_first.values())) == len(GRID), "the candidates must differ for the test to mean anything"
    assert chosen[first] == min(losses_first, key=losses_first.get), losses_first
    assert chosen[last] == min(losses_last, key=losses_last.get), losses_last

    expected = scales_at(model, absmax, chosen, w_stat)
    assert scales.keys() == expected.keys()
    for fqn, s in expected.items():
        torch.testing.assert_close(scales[fqn], s, rtol=0, atol=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the search must not change the model"
    assert all(t.device.type == "cpu" for t in after.values())


CALIB = ["--calib-dataset", "sample", "--calib-samples", "4", "--calib-seqlen", "32", "--device", "cpu"]


def test_cli_alpha_auto_records_choices_and_searches_again_only_for_another_dtype(tmp_path, capsys):
    work = tmp_path / "w"
    main(["smooth", "tiny:llama", "--work-dir", str(work), "--alpha", "auto", "--quant-dtype", "fp8", *CALIB])
    assert "alpha per block" in capsys.readouterr().out
    recorded = json.loads((work / "lite_manifest.json").read_text())["artifacts"]["migration_scales"]
    assert recorded["alpha"] == "auto" and recorded["quant_dtype"] == "fp8"
    assert set(recorded["chosen_alphas"]) == {"model.layers.0", "model.layers.1"}
    assert all(a in [i / 20 for i in range(21)] for a in recorded["chosen_alphas"].values())

    # Exporting another dtype with these scales works but says they were searched for fp8.
    main(["export", "tiny:llama", "--work-dir", str(work), "--out-dir", str(tmp_path / "int8-from-fp8")])
    assert "searched (--alpha auto) for fp8, not int8" in capsys.readouterr().out

    # smooth_quant with the same settings reuses the scales; another dtype searches again.
    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), "--alpha", "auto", "--quant-dtype", "fp8",
          "--format", "compressed-tensors", *CALIB])
    assert "alpha per block" not in capsys.readouterr().out
    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), "--alpha", "auto", "--quant-dtype", "int8",
          "--out-dir", str(tmp_path / "int8"), *CALIB])
    assert "alpha per block" in capsys.readouterr().out
    recorded = json.loads((work / "lite_manifest.json").read_text())["artifacts"]["migration_scales"]
    assert recorded["quant_dtype"] == "int8"
