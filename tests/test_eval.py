"""`lite eval`: one row per model (float, lmdeploy and compressed-tensors checkpoints), the float row's
perplexity equals a direct computation, and the JSON file holds the same table."""

import json
import math

import torch
import torch.nn.functional as F

from helpers import random_tokens
from lite import compressed_tensors as ct
from lite.data import SAMPLE_TEXT
from lite.eval import evaluate
from lite.export import quantize_model_, write_checkpoint
from lite.model import build_tiny, byte_tokenizer
from lite.observers import ActSettings

SEQLEN, SAMPLES = 64, 6


def direct_perplexity(model, tokenizer, text: str) -> float:
    """exp(mean NLL) over BOS + windows of SEQLEN - 1 tokens, written out independently of lite.eval."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = SEQLEN - 1
    nll, count = 0.0, 0
    for i in range(SAMPLES):
        window = torch.tensor([tokenizer.bos_token_id] + ids[i * body:(i + 1) * body])[None]  # (1, SEQLEN)
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=window).logits.float()[0, :-1], dim=-1)  # (SEQLEN - 1, vocab)
        nll -= logp.gather(1, window[0, 1:, None]).sum().item()
        count += body
    return math.exp(nll / count)


def test_eval_table_json_and_float_row(tmp_path, capsys):
    tokenizer = byte_tokenizer()
    float_dir, lmdeploy_dir, ct_dir = (str(tmp_path / n) for n in ("float", "lmdeploy", "ct"))
    build_tiny("llama").save_pretrained(float_dir)
    tokenizer.save_pretrained(float_dir)
    write_checkpoint(quantize_model_(build_tiny("llama"), "int8", None, False, progress=False), tokenizer, None,
                     lmdeploy_dir)
    model = ct.quantize_model_(build_tiny("llama"), "int8", None, ActSettings("static"), random_tokens(), 2,
                               progress=False)
    ct.write_checkpoint(model, tokenizer, None, ct_dir)
    text_file = SAMPLE_TEXT
    json_out = str(tmp_path / "table.json")

    rows = evaluate([float_dir, lmdeploy_dir, ct_dir], str(text_file), SEQLEN, SAMPLES, 4, "cpu", json_out)

    assert [r["model"] for r in rows] == [float_dir, lmdeploy_dir, ct_dir]
    assert [r["quantization"] for r in rows] == ["none", "smooth_quant int8", "ct int8 static"]
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 1 + len(rows) and all(r["model"] in line for r, line in zip(rows, table[1:]))
    with open(text_file, encoding="utf-8") as f:
        expected = direct_perplexity(build_tiny("llama"), tokenizer, f.read())
    assert math.isclose(rows[0]["perplexity"], expected, rel_tol=1e-5)
    assert rows[0]["relative_change_pct"] == 0.0
    assert all(r["windows"] == SAMPLES and r["seqlen"] == SEQLEN for r in rows)
    assert all(abs(r["relative_change_pct"]) < 5 for r in rows)  # int8 on a random model: near the float row
    with open(json_out) as f:
        assert json.load(f) == rows


def direct_fidelity(reference, model, tokenizer, text: str) -> tuple[float, float]:
    """(mean KL(P_reference || Q_model) per scored token, top-1 agreement), written out with plain sums
    over probabilities, independently of lite.eval."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body, kl, agree, count = SEQLEN - 1, 0.0, 0, 0
    for i in range(SAMPLES):
        window = torch.tensor([tokenizer.bos_token_id] + ids[i * body:(i + 1) * body])[None]
        with torch.no_grad():
            p = torch.softmax(reference(input_ids=window).logits.double()[0, :-1], dim=-1)  # (SEQLEN - 1, vocab)
            q = torch.softmax(model(input_ids=window).logits.double()[0, :-1], dim=-1)
        kl += (p * (p.log() - q.log())).sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        count += body
    return kl / count, agree / count


def test_eval_reports_kl_and_top1_agreement_against_the_first_model(tmp_path):
    tokenizer = byte_tokenizer()
    float_dir, q_dir, other_dir = (str(tmp_path / n) for n in ("float", "q", "other"))
    reference = build_tiny("llama")
    reference.save_pretrained(float_dir)
    tokenizer.save_pretrained(float_dir)
    write_checkpoint(quantize_model_(build_tiny("llama"), "int8", None, False, progress=False), tokenizer, None, q_dir)
    build_tiny("llama", seed=1).save_pretrained(other_dir)  # a different model altogether: far from the reference
    tokenizer.save_pretrained(other_dir)
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        text = f.read()

    rows = evaluate([float_dir, q_dir, other_dir], SAMPLE_TEXT, SEQLEN, SAMPLES, 4, "cpu", None)

    assert rows[0]["kl"] == 0.0 and rows[0]["top1_agreement"] == 1.0
    from lite.export import load_quantized

    kl, agree = direct_fidelity(reference, load_quantized(q_dir), tokenizer, text)
    assert math.isclose(rows[1]["kl"], kl, rel_tol=1e-3) and rows[1]["top1_agreement"] == agree
    assert 0 < rows[1]["kl"] < 0.01 * rows[2]["kl"]  # int8 of the same model is far closer than another model
    assert rows[2]["top1_agreement"] < rows[1]["top1_agreement"]
