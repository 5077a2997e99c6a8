"""Loading models and walking their decoder blocks.

MODEL on the command line is a local folder, a Hugging Face hub id, or `tiny:<model_type>`: a small
random model of that family that `lite` builds itself (with a byte-level tokenizer), so the whole
pipeline runs on a fresh machine with no download.
"""

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from lite.archs import ARCHS, Arch, arch_for, dense_blocks, num_experts
from lite.errors import LiteError
from lite.moe import unfuse_experts_
from lite.quant import all_finite

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TINY_PREFIX = "tiny:"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# Types with sliding-window attention get a window shorter than the tests' windows, so that their
# sliding layers really differ from full attention in every test (issue 11).
TINY_SLIDING_WINDOW = 16


def tiny_config(model_type: str, **overrides):
    """A small config of `model_type` with grouped-query attention (8 query heads, 4 KV heads); a type with
    sliding-window layers gets a window of `TINY_SLIDING_WINDOW` tokens (qwen2: on its second layer)."""
    from transformers import AutoConfig

    if model_type not in ARCHS:
        raise LiteError(f"no tiny model for {model_type!r}; choose one of: {', '.join(sorted(ARCHS))}")
    settings = dict(
        vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=512,
        bos_token_id=256, eos_token_id=257, pad_token_id=None, tie_word_embeddings=True,
    )
    if model_type == "qwen2":
        settings.update(use_sliding_window=True, max_window_layers=1)
    if ARCHS[model_type].experts is not None:  # 4 experts, 2 per token, every layer sparse
        settings.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                        mlp_only_layers=[])
        if model_type == "qwen2_moe":
            settings.update(shared_expert_intermediate_size=48)
    if model_type in ("deepseek_v2", "deepseek_v3"):  # latent attention; block 0 dense, then MoE (v3: routed
        # within 1 of 2 groups)
        settings.update(n_routed_experts=4, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                        num_key_value_heads=8, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=3)
        del settings["num_experts"], settings["decoder_sparse_step"], settings["mlp_only_layers"]
    if getattr(AutoConfig.for_model(model_type), "sliding_window", None) is not None or model_type == "qwen2":
        settings["sliding_window"] = TINY_SLIDING_WINDOW
    rope = dict(getattr(AutoConfig.for_model(model_type), "rope_parameters", None) or {})
    if "original_max_position_embeddings" in rope and "factor" in rope:  # YaRN (gpt_oss): the same stretch
        settings["rope_parameters"] = {**rope, "original_max_position_embeddings":
                                       settings["max_position_embeddings"] // int(rope["factor"])}
    settings.update(overrides)
    return AutoConfig.for_model(model_type, **settings)


def shrunk_config(config, vocab_size: int = 64):
    """A copy of `config` that builds a small model with the same kinds of parts: one block per layer type
    (in the order they first appear), `vocab_size` tokens, MLPs 16 wide, 2 experts; hidden size, heads and
    everything else kept. For checks and for the buffers a config alone defines."""
    import copy

    small = copy.deepcopy(config)
    types = list(getattr(config, "layer_types", None) or [])
    layers = max([types.index(t) for t in set(types)], default=0) + 1
    small.num_hidden_layers, small.vocab_size, small.pad_token_id = layers, vocab_size, None
    for width in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if isinstance(getattr(small, width, None), int):
            setattr(small, width, 16)
    if isinstance(num_experts(small), int) and isinstance(getattr(small, "num_experts_per_tok", None), int):
        small.num_experts_per_tok = min(small.num_experts_per_tok, 2)
        for name in ("num_experts", "num_local_experts", "n_routed_experts"):
            if isinstance(getattr(small, name, None), int):
                setattr(small, name, max(2, small.num_experts_per_tok))
        if isinstance(getattr(small, "n_group", None), int):  # DeepSeek's group-limited routing: one group
            small.n_group = small.topk_group = 1
        dense = dense_blocks(config)  # a dense and a MoE block, where the model has both
        if dense and len(dense) < config.num_hidden_layers:
            small.num_hidden_layers = max(small.num_hidden_layers, 2)
            if isinstance(getattr(small, "first_k_dense_replace", None), int):
                small.first_k_dense_replace = 1
            else:
                small.mlp_only_layers, small.decoder_sparse_step = [0], 1
    if types:
        small.layer_types = types[:small.num_hidden_layers]
    for name in ("bos_token_id", "eos_token_id"):
        if isinstance(getattr(small, name, None), int) and getattr(small, name) >= vocab_size:
            setattr(small, name, 0)
    return small


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, and initializing them
    costs nothing) while their buffers are computed for real: for the buffers a config alone defines
    (rotary tables, Gemma's embedding scale), without a second of random initialization of weights
    that nobody reads."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def byte_tokenizer():
    """A byte-level tokenizer over 256 byte tokens plus `<s>` (256) and `</s>` (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_tiny(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random model of `model_type` from `tiny_config`, initialised with a fixed seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = unfuse_experts_(AutoModelForCausalLM.from_config(config, dtype=dtype), arch_for(config))
    # Random init leaves norm weights at their constant start; spread them so tests see real folding.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5) if ARCHS[model_type].norm_offset == 0 else p.uniform_(-0.5, 0.5)
            elif name.endswith("norm.bias"):  # LayerNorm biases start at zero
                p.uniform_(-0.2, 0.2)
            elif name.endswith(("mlp.gate.weight", "mlp.router.weight")):  # routers start at zero: give them
                p.normal_(0, 0.5)                                           # real preferences
            elif name.endswith(("mlp.router.bias", "self_attn.sinks")) or \
                    (".experts." in name and name.endswith(".bias")):
                p.normal_(0, 0.3)  # gpt_oss: biases of the router and the experts, attention sinks
    return model.eval()


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user passed
    folder: str | None  # the local folder the weights came from, if any

    @property
    def config(self):
        return self.model.config

    @property
    def arch(self) -> Arch:
        return arch_for(self.model.config)


def resolve_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise LiteError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def local_folder(source: str) -> str | None:
    """`source` when it is a local model folder, None when it is a hub id; refuses anything else
    (a path that does not exist is not tried on the hub: that would only retry for half a minute)."""
    if os.path.exists(source):
        if not os.path.isdir(source) or not os.path.isfile(os.path.join(source, "config.json")):
            raise LiteError(f"{source} is not a model folder (no config.json); pass a Hugging Face model folder or hub id")
        return source
    first = source.split("/", 1)[0]
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(source) or os.path.isdir(first):
        raise LiteError(f"model path {source} does not exist; pass a local model folder or a hub id like org/name")
    return None


# What a streamed run needs from a hub repository: config, weights, tokenizer and generation files.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def download(repo_id: str) -> str:
    """The local folder of a hub model, downloaded into the Hugging Face cache (or found there), so that
    it streams like any local folder."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:  # offline, unknown repo, gated, disk full: huggingface_hub raises many types
        raise LiteError(f"could not download {repo_id} from the hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); pass a local model folder") from None


def read_config(source: str, trust_remote_code: bool = False):
    """The model's config, with a one-line error for a missing, malformed or unknown `model_type`."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise LiteError(f"could not load {source}: not a local folder and not reachable on the hub "
                        f"({str(e).splitlines()[0]})") from e
    except ValueError as e:  # no or unknown model_type, or config.json that is not JSON
        raise LiteError(f"{source}/config.json does not describe a model transformers knows ({str(e).splitlines()[0]}); "
                        f"lite supports model_type: {', '.join(sorted(ARCHS))}") from None
    arch_for(config)  # fail on an unsupported type before reading any weights
    return config


def check_not_quantized(config, source: str) -> None:
    """Refuse a checkpoint that is already quantized (its config has a `quantization_config`): lite starts
    from float weights."""
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise LiteError(f"{source} is already quantized (quantization_config, quant_method {method!r}); lite "
                        "quantizes float checkpoints: pass the bf16/fp16 original (DeepSeek-V3's fp8 release: "
                        "convert it to bf16 first)")


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises ValueError, OSError or TypeError for missing tokenizer files
        raise LiteError(f"no usable tokenizer in {source} ({type(e).__name__}); copy the tokenizer files of the "
                        "original model (tokenizer.json, tokenizer_config.json, ...) into it") from None


def check_finite_tensor(name: str, t: torch.Tensor, row_start: int = 0) -> None:
    """Refuse NaN/Inf in a weight outside the blocks (embeddings, final norm, lm_head), naming the row
    (`t` may be rows `row_start...` of the weight)."""
    if all_finite(t):
        return
    bad = ~torch.isfinite(t)
    if bad.any():
        index = tuple(i.item() for i in bad.nonzero()[0])
        where = f"row {row_start + index[0]}" + (f", column {index[1]}" if len(index) > 1 else "")
        raise LiteError(f"weight {name} holds {t[index].item()} at {where}; the model is corrupt: re-download it")


def load_model(source: str, dtype: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """Load MODEL (folder, hub id or `tiny:<type>`) on the CPU in eval mode, checking its architecture,
    its tokenizer and its checkpoint files before reading any weight."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    source = str(source)
    if source.startswith(TINY_PREFIX):
        model = build_tiny(source[len(TINY_PREFIX):], dtype=torch.float32 if torch_dtype == "auto" else torch_dtype)
        return LoadedModel(model, byte_tokenizer(), source, None)
    folder = local_folder(source)
    read_config(source, trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code)
    if folder is not None:
        from lite.shards import ShardReader, checkpoint_files

        if checkpoint_files(folder):
            ShardReader(folder)  # checks every safetensors file's header and size
    model, info = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                       output_loading_info=True)
    arch = arch_for(model.config)
    # transformers starts a parameter the checkpoint lacks (or names so that it cannot map it) from random
    # values, with a warning; quantizing that would be quantizing noise.
    tied = f"{arch.lm_head}.weight" if getattr(model.config, "tie_word_embeddings", False) else None
    missing = [name for name in info.get("missing_keys") or [] if name != tied]
    if missing:
        raise LiteError(f"{source} has no tensor for {missing[0]} ({len(missing)} parameters missing, or under "
                        "names transformers does not map); re-download the model or check that it is the "
                        f"{model.config.model_type} checkpoint its config.json says")
    unfuse_experts_(model, arch)
    inside = arch.blocks + "."
    for name, p in model.named_parameters():
        if not name.startswith(inside):
            check_finite_tensor(name, p.detach())
    return LoadedModel(model.eval(), tokenizer, source, folder)


def config_hash(config) -> str:
    """A digest of the architecture-defining config, stable across tool and library versions."""
    d = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype",
                                                 "quantization_config", "architectures")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(model: nn.Module) -> str:
    """A cheap digest of the weights (a few values of each tensor) that tells two checkpoints apart."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 16)][:16].float().numpy().tobytes())
    return h.hexdigest()[:16]


def decoder_blocks(model: nn.Module, arch: Arch) -> dict[str, nn.Module]:
    """`{block fqn: block}` in order, e.g. `{"model.layers.0": ...}`."""
    layers = model.get_submodule(arch.blocks)
    return {f"{arch.blocks}.{i}": block for i, block in enumerate(layers)}


def move_outside_blocks_(model: nn.Module, arch: Arch, device) -> None:
    """Move every parameter and buffer except those inside the decoder blocks to `device`."""
    inside = arch.blocks + "."
    for name, module in model.named_modules():
        if name == arch.blocks or name.startswith(inside):
            continue
        for key, p in module._parameters.items():
            if p is not None:
                p.data = p.data.to(device)
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = b.to(device)
