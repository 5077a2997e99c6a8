"""What `lite` knows about each model family: one record per shape, keyed by `config.model_type`.

Module names are dotted paths relative to one decoder block (`model.layers.<i>`). To add a family
whose blocks look like an existing one, add its `model_type` to `ARCHS`; for a new shape, write a
new `Arch` record. Nothing here inspects class names.
"""

from dataclasses import dataclass, replace
from typing import Callable

from lite.errors import LiteError


def _value_rows_of_qkv(config) -> slice:
    """Rows of a packed `qkv_proj` weight that produce V (Phi-3 packs q, k, v in that order)."""
    head_dim = _head_dim(config)
    start = (config.num_attention_heads + _num_kv_heads(config)) * head_dim
    return slice(start, start + _num_kv_heads(config) * head_dim)


def _up_rows_of_gate_up(config) -> slice:
    """Rows of a packed `gate_up_proj` weight that produce `up` (Phi-3 chunks gate first, then up)."""
    return slice(config.intermediate_size, 2 * config.intermediate_size)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _num_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


@dataclass(frozen=True)
class NormPair:
    """A norm and the linears that read its output."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class LinearPair:
    """A linear whose output channels feed `consumer`'s input channels one to one.

    `producer_rows` selects the producing rows of a packed weight (None: all rows). With
    `per_kv_head`, the consumer reads attention output: its `num_attention_heads * head_dim` input
    channels map onto the producer's `num_key_value_heads * head_dim` V channels (grouped-query
    attention repeats each KV head over its group of query heads).
    """

    producer: str
    consumer: str
    producer_rows: Callable | None = None
    per_kv_head: bool = False


@dataclass(frozen=True)
class Arch:
    norm_pairs: tuple[NormPair, ...]
    linear_pairs: tuple[LinearPair, ...]
    # Gemma's RMSNorm computes x * (1 + w); the others x * w.
    norm_offset: float = 0.0
    blocks: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Linears inside the blocks that must stay in float (MoE routers).
    keep_float: tuple[str, ...] = ()
    # Linears whose output is added to the residual stream (rotations turn their rows).
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # Mixture-of-Experts: the experts module of a block (`lite.moe.Experts` once unfused). Names holding
    # `{e}` stand for every expert; `arch_for` writes them out for the config's number of experts.
    experts: str | None = None

    def for_experts(self, n: int) -> "Arch":
        """This record with every `{e}` name written out for experts 0 .. n-1."""
        def names(items):
            return tuple(x.format(e=e) for x in items for e in (range(n) if "{e}" in x else (0,)))

        def linear_pairs():
            for p in self.linear_pairs:
                for e in range(n) if "{e}" in p.producer + p.consumer else (0,):
                    yield replace(p, producer=p.producer.format(e=e), consumer=p.consumer.format(e=e))

        return replace(self, norm_pairs=tuple(replace(p, linears=names(p.linears)) for p in self.norm_pairs),
                       linear_pairs=tuple(linear_pairs()), keep_float=names(self.keep_float),
                       residual_writers=names(self.residual_writers))


_LLAMA = Arch(
    norm_pairs=(
        NormPair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        NormPair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    linear_pairs=(
        LinearPair("self_attn.v_proj", "self_attn.o_proj", per_kv_head=True),
        LinearPair("mlp.up_proj", "mlp.down_proj"),
    ),
)

_PHI3 = Arch(
    norm_pairs=(
        NormPair("input_layernorm", ("self_attn.qkv_proj",)),
        NormPair("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ),
    linear_pairs=(
        LinearPair("self_attn.qkv_proj", "self_attn.o_proj", _value_rows_of_qkv, per_kv_head=True),
        LinearPair("mlp.gate_up_proj", "mlp.down_proj", _up_rows_of_gate_up),
    ),
)

_GEMMA = Arch(norm_pairs=_LLAMA.norm_pairs, linear_pairs=_LLAMA.linear_pairs, norm_offset=1.0)

# MoE (issue 11): the router (`mlp.gate`, a weight without a Linear around it) reads the norm like the
# experts do: it receives the factor on its input columns and stays float. It comes last in the pair,
# so that the pair's statistics are an expert's.
_EXPERT = "mlp.experts.{e}."
_QWEN3_MOE = Arch(
    norm_pairs=(
        _LLAMA.norm_pairs[0],
        NormPair("post_attention_layernorm", (_EXPERT + "gate_proj", _EXPERT + "up_proj", "mlp.gate")),
    ),
    linear_pairs=(_LLAMA.linear_pairs[0], LinearPair(_EXPERT + "up_proj", _EXPERT + "down_proj")),
    keep_float=("mlp.gate",),
    residual_writers=("self_attn.o_proj", _EXPERT + "down_proj"),
    experts="mlp.experts",
)

# Qwen2-MoE adds a shared expert, always on, scaled by sigmoid(shared_expert_gate(x)) (a float linear).
_QWEN2_MOE = Arch(
    norm_pairs=(
        _LLAMA.norm_pairs[0],
        NormPair("post_attention_layernorm", (_EXPERT + "gate_proj", _EXPERT + "up_proj", "mlp.shared_expert.gate_proj",
                                              "mlp.shared_expert.up_proj", "mlp.gate", "mlp.shared_expert_gate")),
    ),
    linear_pairs=(_LLAMA.linear_pairs[0], LinearPair(_EXPERT + "up_proj", _EXPERT + "down_proj"),
                  LinearPair("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")),
    keep_float=("mlp.gate", "mlp.shared_expert_gate"),
    residual_writers=("self_attn.o_proj", _EXPERT + "down_proj", "mlp.shared_expert.down_proj"),
    experts="mlp.experts",
)

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _PHI3,
    "gemma": _GEMMA,
    # Llama-shaped blocks (issue 11): smoothing folds exactly, streamed == loaded, on a tiny model of each.
    # Not yet: exaone (other module names) and doge (a dt_proj in attention).
    "internlm3": _LLAMA,
    "iquestcoder": _LLAMA,
    "ministral3": _LLAMA,
    "helium": _LLAMA,
    "granite": _LLAMA,
    "seed_oss": _LLAMA,
    "smollm3": _LLAMA,
    "hunyuan_v1_dense": _LLAMA,
    "ernie4_5": _LLAMA,
    "hyperclovax": _LLAMA,
    # With sliding-window layers: each block is calibrated with its own layer's mask (`capture_block_inputs`).
    "ministral": _LLAMA,
    "granite_swa": _LLAMA,
    "cwm": _LLAMA,
    # Mixture-of-Experts, every layer sparse; experts unfused into one linear each (`lite.moe`).
    "qwen3_moe": _QWEN3_MOE,
    "olmoe": _QWEN3_MOE,
    "qwen2_moe": _QWEN2_MOE,
}


def arch_for(config) -> Arch:
    """The record for `config.model_type`, or an error listing the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise LiteError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))} "
            "(to add one, give it a record in lite/archs.py)"
        )
    arch = ARCHS[model_type]
    if arch.experts is None:
        return arch
    sparse_step, dense = getattr(config, "decoder_sparse_step", 1), getattr(config, "mlp_only_layers", None) or []
    if sparse_step != 1 or dense:
        raise LiteError(f"this {model_type} model mixes dense and MoE layers (mlp_only_layers={dense}, "
                        f"decoder_sparse_step={sparse_step}); lite quantizes only models whose every layer is MoE")
    return arch.for_experts(config.num_experts)


def kv_group_index(config):
    """For each attention-output channel, the V channel it comes from: `(num_heads * head_dim,)`."""
    import torch

    head_dim, num_heads, num_kv = _head_dim(config), config.num_attention_heads, _num_kv_heads(config)
    query_head = torch.arange(num_heads).repeat_interleave(head_dim)  # (num_heads * head_dim,)
    kv_head = query_head // (num_heads // num_kv)
    return kv_head * head_dim + torch.arange(head_dim).repeat(num_heads)


def quantized_linears(arch: Arch, block) -> list[str]:
    """Names (relative to the block) of every nn.Linear in a block that gets quantized."""
    import torch.nn as nn

    return [
        name
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and name not in arch.keep_float
    ]


def quantizing_norms(arch: Arch) -> list[str]:
    """The norms whose output only quantized linears read: lmdeploy's layout fuses per-token activation
    quantization into them (QRMSNorm). A norm a float module also reads (a MoE router) stays a norm, and
    the linears after it quantize their input themselves, to the same values."""
    return [pair.norm for pair in arch.norm_pairs if not any(name in arch.keep_float for name in pair.linears)]


def float_linears(model) -> list[str]:
    """Names of every nn.Linear of the model still in float (after a swap: `lm_head`, float readers)."""
    import torch.nn as nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def float_in_blocks(model) -> list[str]:
    """Names of the modules inside the blocks that the record keeps float (routers, `shared_expert_gate`)."""
    arch = arch_for(model.config)
    layers = model.get_submodule(arch.blocks)
    return [f"{arch.blocks}.{i}.{name}" for i in range(len(layers)) for name in arch.keep_float]


def unquantized(model) -> list[str]:
    """What a checkpoint lists as left in float: every float linear and every float reader in the blocks
    (a router may be a bare weight that a serving engine still builds as a linear)."""
    listed = set(float_in_blocks(model)) | set(float_linears(model))
    return [name for name, _ in model.named_modules() if name in listed]


def check_record(arch: Arch, model) -> None:
    """Refuse a model the record does not describe, naming the first module that is missing or of the
    wrong kind (instead of a KeyError deep in a stage): the embeddings, blocks, final norm and lm_head,
    and in block 0 every norm and linear the record names, the linears reading a norm as wide as it."""
    import torch.nn as nn

    model_type = getattr(model.config, "model_type", None)

    def fail(what: str) -> None:
        raise LiteError(f"the lite record for model_type {model_type!r} does not fit this model: {what}; "
                        "the model's modules differ from the family's (see lite/archs.py)")

    def get(root, name: str, where: str):
        try:
            return root.get_submodule(name)
        except AttributeError:
            fail(f"{where} has no module {name}")

    for name in (arch.embed, arch.final_norm, arch.lm_head):
        get(model, name, "the model")
    blocks = get(model, arch.blocks, "the model")
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        fail(f"{arch.blocks} is not a list of decoder blocks")
    block, where = blocks[0], f"block {arch.blocks}.0"
    for pair in arch.norm_pairs:
        norm = get(block, pair.norm, where)
        width = getattr(getattr(norm, "weight", None), "shape", (None,))[0]
        for name in pair.linears:
            linear = get(block, name, where)
            weight = getattr(linear, "weight", None)  # a router may be a bare weight, not an nn.Linear
            if not (isinstance(linear, nn.Linear) or name in arch.keep_float) or weight is None or \
                    weight.dim() != 2 or weight.shape[1] != width:
                fail(f"{name} is not a linear reading {pair.norm}'s {width} channels")
    for name in [p.producer for p in arch.linear_pairs] + [p.consumer for p in arch.linear_pairs] + \
            list(arch.residual_writers):
        if not isinstance(get(block, name, where), nn.Linear):
            fail(f"{where}.{name} is not a linear")
