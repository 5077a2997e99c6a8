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
