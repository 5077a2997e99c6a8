"""Plain helpers the tests import (`from helpers import ...`); fixtures live in conftest.py."""

import functools
import hashlib

import pytest
import torch

from lite.archs import arch_for
from lite.steps.stats import collect_statistics
from lite.cli.main import main
from lite.model import build_tiny, byte_tokenizer, decoder_blocks


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits `(batch, seq, vocab)` without a cache."""
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: how far apart two sets of logits are, relative to their size."""
    return ((a - b).abs().max() / b.abs().max()).item()


def arch_of(model):
    return arch_for(model.config)


def blocks_of(model) -> dict:
    """`{block fqn: block}`, e.g. `{"model.layers.0": ...}`."""
    return decoder_blocks(model, arch_of(model))


def input_absmax(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """`inputs_stats["absmax"]` of `model` collected by the layer-wise runner on `tokens`."""
    inputs, _ = collect_statistics(model, arch_of(model), tokens, batch_size=2, device="cpu", progress=False)
    return inputs["absmax"]


def random_tokens(batch: int = 4, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    """Random byte tokens `(batch, seqlen)` (the tiny models' vocabulary is 256 bytes + BOS/EOS)."""
    return torch.randint(0, 256, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@functools.cache
def _tiny_absmax(model_type: str) -> dict[str, torch.Tensor]:
    return input_absmax(build_tiny(model_type), random_tokens())


def tiny_absmax(model_type: str) -> dict[str, torch.Tensor]:
    """`input_absmax(build_tiny(model_type), random_tokens())`, computed once per session (both are
    deterministic); a fresh copy each call so that no test can change another's statistics."""
    return {k: v.clone() for k, v in _tiny_absmax(model_type).items()}


def lite_error(capsys, *args) -> str:
    """Run the CLI expecting a LiteError: exit code 2 and exactly one `lite: error:` line, the last."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").split("\n")
    assert lines[-1].startswith("lite: error: "), err
    assert sum(line.startswith("lite: error:") for line in lines) == 1, err
    return lines[-1].removeprefix("lite: error: ")


def leftovers(root) -> list[str]:
    """Temporary files or folders lite may have left anywhere under `root`."""
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def save_tiny(folder, model_type="llama", **overrides):
    model = build_tiny(model_type, **overrides)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


def fused_model(model_type: str, dtype=torch.float32) -> torch.nn.Module:
    """transformers' own model (fused 3-D experts) with the weights of `build_tiny(model_type)`."""
    from transformers import AutoModelForCausalLM

    from lite.model import tiny_config

    unfused = build_tiny(model_type, dtype=dtype)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=dtype).eval()
    state = unfused.state_dict()
    arch = arch_for(model.config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # The fused layouts, as transformers documents them: [gate; up] rows, or (gpt_oss) gate and up
            # interleaved, stored transposed `(E, H, 2I)`, with biases.
            experts = model.get_submodule(name.rsplit(".", 1)[0])
            interleaved, transposed = not getattr(experts, "is_concatenated", True), getattr(experts, "is_transposed", False)
            kind = name.rsplit(".", 1)[1].removesuffix("_bias")
            if kind in ("gate_up_proj", "down_proj") and name.rsplit(".", 1)[0].endswith("experts"):
                prefix, what = name.rsplit(".", 1)[0] + ".", "bias" if name.endswith("_bias") else "weight"
                per = []
                for e in range(p.shape[0]):
                    if kind == "down_proj":
                        t = state[f"{prefix}{e}.down_proj.{what}"]
                    else:
                        g, u = state[f"{prefix}{e}.gate_proj.{what}"], state[f"{prefix}{e}.up_proj.{what}"]
                        t = torch.stack([g, u], 1).flatten(0, 1) if interleaved else torch.cat([g, u])
                    per.append(t.T if transposed and what == "weight" else t)
                p.copy_(torch.stack(per))
            else:
                p.copy_(state[name])
    assert arch.experts is not None
    return model
