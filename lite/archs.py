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


def _value_rows_of_kv_b(config):
    """Rows of multi-head latent attention's `kv_b_proj` that produce V: each head's rows are its
    `qk_nope_head_dim` key rows, then its `v_head_dim` value rows (DeepSeek-V3)."""
    import torch

    nope, v = config.qk_nope_head_dim, config.v_head_dim
    return (torch.arange(config.num_attention_heads)[:, None] * (nope + v) + nope + torch.arange(v)).flatten()


def num_experts(config) -> int | None:
    """The number of routed experts, under any of the names configs give it."""
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


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

    `producer_rows` selects the producing rows of a packed weight, as a slice or an index tensor (None: all
    rows). With
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
    # LayerNorm families: the norms subtract the mean (and may add a bias, which folding divides too);
    # lmdeploy's fused RMSNorm+quant does not apply, nor do fuse_norms and rotate.
    layer_norm: bool = False
    # False where rotating the residual stream is not exact: norms after the attention or MLP output
    # (gemma2's sandwich, olmo2), or LayerNorm's mean subtraction.
    rotatable: bool = True
    # Where the checkpoint names a tensor otherwise than the model in memory does (transformers renames at
    # load time): (in-memory fragment, checkpoint fragment) pairs of dotted names, applied in order; a
    # leading "^" anchors a fragment at the start of the name (`to_checkpoint`, `from_checkpoint`). No
    # fragment may overlap another's result, so that the map reverses.
    checkpoint_names: tuple[tuple[str, str], ...] = ()
    # Mixture-of-Experts: the experts module of a block (`lite.moe.Experts` once unfused). Names holding
    # `{e}` stand for every expert; `arch_for` writes them out for the config's number of experts.
    experts: str | None = None
    # A MoE family whose models may also have dense blocks (DeepSeek's first layers, `mlp_only_layers`): the
    # record of those blocks. `arch_for` sets `dense_blocks` from the config; `of_block` picks the record.
    dense: "Arch | None" = None
    dense_blocks: frozenset[int] = frozenset()

    def of_block(self, i: int) -> "Arch":
        """The record of decoder block `i`."""
        return self.dense if i in self.dense_blocks else self

    def at(self, prefix: str) -> "Arch":
        """The record of the block named `prefix` (`model.layers.3`)."""
        return self.of_block(int(prefix.rsplit(".", 1)[1])) if self.dense_blocks else self

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

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

# Sandwich norms (gemma2, gemma3): the norm feeding gate/up is the pre-feedforward one; the post norms
# act on the attention and MLP outputs before the residual add.
_GEMMA2 = Arch(
    norm_pairs=(NormPair("input_layernorm", _QKV),
                NormPair("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    linear_pairs=_LLAMA.linear_pairs, norm_offset=1.0, rotatable=False,
)

# Norms after attention and MLP (olmo2): nothing normalizes the linears' inputs, but v -> o and
# up -> down still smooth.
_OLMO2 = Arch(norm_pairs=(), linear_pairs=_LLAMA.linear_pairs, rotatable=False)

# One LayerNorm feeds attention and MLP in parallel (cohere).
_COHERE = Arch(
    norm_pairs=(NormPair("input_layernorm", _QKV + ("mlp.gate_proj", "mlp.up_proj")),),
    linear_pairs=_LLAMA.linear_pairs, layer_norm=True, rotatable=False,
)

# LayerNorm with a bias, llama's module names (stablelm).
_STABLELM = Arch(norm_pairs=_LLAMA.norm_pairs, linear_pairs=_LLAMA.linear_pairs, layer_norm=True, rotatable=False)

# LayerNorm with a bias; fc1 -> gelu -> fc2 is no smoothing pair (the factor does not pass through gelu).
_PHI = Arch(
    norm_pairs=(NormPair("input_layernorm", _QKV + ("mlp.fc1",)),),  # parallel attention and MLP
    linear_pairs=(LinearPair("self_attn.v_proj", "self_attn.dense", per_kv_head=True),),
    final_norm="model.final_layernorm", layer_norm=True, rotatable=False,
    residual_writers=("self_attn.dense", "mlp.fc2"),
)
_STARCODER2 = Arch(
    norm_pairs=(NormPair("input_layernorm", _QKV), NormPair("post_attention_layernorm", ("mlp.c_fc",))),
    linear_pairs=(_LLAMA.linear_pairs[0],), layer_norm=True, rotatable=False,
    residual_writers=("self_attn.o_proj", "mlp.c_proj"),
)

# Doge: llama's names, but a second reader of V (`dt_proj`, the dynamic mask) takes no factor, so v -> o does
# not smooth; learned scales of the residual (`input_residual`) make rotation inexact.
_DOGE = Arch(norm_pairs=_LLAMA.norm_pairs, linear_pairs=(_LLAMA.linear_pairs[1],), rotatable=False)

# Llama's blocks under GPT-2-like checkpoint names, which transformers renames at load time.
_EXAONE = replace(_LLAMA, checkpoint_names=(
    ("^model.embed_tokens.", "^transformer.wte."), ("^model.layers.", "^transformer.h."),
    ("^model.norm.", "^transformer.ln_f."),
    (".self_attn.o_proj.", ".attn.attention.out_proj."), (".self_attn.q_proj.", ".attn.attention.q_proj."),
    (".self_attn.k_proj.", ".attn.attention.k_proj."), (".self_attn.v_proj.", ".attn.attention.v_proj."),
    (".input_layernorm.", ".ln_1."), (".post_attention_layernorm.", ".ln_2."),
    (".mlp.gate_proj.", ".mlp.c_fc_0."), (".mlp.up_proj.", ".mlp.c_fc_1."), (".mlp.down_proj.", ".mlp.c_proj."),
))

# MoE (issue 11): the router (`mlp.gate`, a weight without a Linear around it) reads the norm like the
# experts do: listed in the pair, it receives the factor on its input columns; listed in `keep_float`,
# it stays float and shapes neither the statistics nor the factor.
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
    dense=_LLAMA,  # `mlp_only_layers`, `decoder_sparse_step`
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
    dense=_LLAMA,
)

# DeepSeek-V3: multi-head latent attention (queries and keys/values through a low-rank linear and a
# norm each; V comes from `kv_b_proj`'s value rows), a routed MoE with a shared expert and a router with
# a score-correction bias, and dense first blocks (`first_k_dense_replace`).
_MLA = (
    NormPair("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
    NormPair("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
    NormPair("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
)
_MLA_V_O = LinearPair("self_attn.kv_b_proj", "self_attn.o_proj", _value_rows_of_kv_b)
_DEEPSEEK_V3 = Arch(
    norm_pairs=_MLA + (
        NormPair("post_attention_layernorm", (_EXPERT + "gate_proj", _EXPERT + "up_proj",
                                              "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                                              "mlp.gate")),
    ),
    linear_pairs=(_MLA_V_O, LinearPair(_EXPERT + "up_proj", _EXPERT + "down_proj"),
                  LinearPair("mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj")),
    keep_float=("mlp.gate",),
    residual_writers=("self_attn.o_proj", _EXPERT + "down_proj", "mlp.shared_experts.down_proj"),
    rotatable=False,  # the readers of q_a_layernorm and kv_a_layernorm are not on the residual stream
    experts="mlp.experts",
    dense=Arch(norm_pairs=_MLA + (_LLAMA.norm_pairs[1],), linear_pairs=(_MLA_V_O, _LLAMA.linear_pairs[1]),
               rotatable=False),
)
# Without a query LoRA (DeepSeek-V2-Lite's shape), q_proj reads the input norm.
_DEEPSEEK_V3_NO_Q_LORA = replace(
    _DEEPSEEK_V3,
    norm_pairs=(NormPair("input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
                _MLA[2], _DEEPSEEK_V3.norm_pairs[3]),
    dense=replace(_DEEPSEEK_V3.dense, norm_pairs=(NormPair("input_layernorm", ("self_attn.q_proj",
                                                                                "self_attn.kv_a_proj_with_mqa")),
                                                  _MLA[2], _LLAMA.norm_pairs[1])),
)

# gpt_oss: experts with biases and a clamped gate, (up + 1) * gate * sigmoid(alpha * gate), through which
# no factor passes (no up -> down pair); a router with a bias (`mlp.router`); attention sinks.
_GPT_OSS = Arch(
    norm_pairs=(_LLAMA.norm_pairs[0],
                NormPair("post_attention_layernorm", (_EXPERT + "gate_proj", _EXPERT + "up_proj", "mlp.router"))),
    linear_pairs=(_LLAMA.linear_pairs[0],),
    keep_float=("mlp.router",),
    residual_writers=("self_attn.o_proj", _EXPERT + "down_proj"),
    experts="mlp.experts",
)

# Mixtral: Qwen3-MoE's blocks in memory; on disk `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down).
_MIXTRAL = replace(_QWEN3_MOE, checkpoint_names=(
    (".mlp.experts.", ".block_sparse_moe.experts."), (".mlp.gate.", ".block_sparse_moe.gate."),
    (".gate_proj.", ".w1."), (".up_proj.", ".w3."), (".down_proj.", ".w2."),
))

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _PHI3,
    "gemma": _GEMMA,
    # Llama-shaped blocks (issue 11): smoothing folds exactly, streamed == loaded, on a tiny model of each.
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
    "doge": _DOGE,
    # With sliding-window layers: each block is calibrated with its own layer's mask (`capture_block_inputs`).
    "ministral": _LLAMA,
    "granite_swa": _LLAMA,
    "cwm": _LLAMA,
    "exaone": _EXAONE,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "olmo2": _OLMO2,
    "olmo3": _OLMO2,
    "cohere": _COHERE,
    "cohere2": _COHERE,
    "stablelm": _STABLELM,
    "phi": _PHI,
    "starcoder2": _STARCODER2,
    # Mixture-of-Experts; experts unfused into one linear each (`lite.moe`), dense blocks where the config
    # has them.
    "qwen3_moe": _QWEN3_MOE,
    "olmoe": _QWEN3_MOE,
    "qwen2_moe": _QWEN2_MOE,
    "mixtral": _MIXTRAL,
    "deepseek_v2": _DEEPSEEK_V3,  # the same blocks; its router picks greedily or by groups
    "deepseek_v3": _DEEPSEEK_V3,
    "gpt_oss": _GPT_OSS,
}


def _rename(name: str, pairs) -> str:
    out = name + "."  # so that a fragment ending in "." also matches a module name
    for old, new in pairs:
        if old.startswith("^"):
            if out.startswith(old[1:]):
                out = new.lstrip("^") + out[len(old) - 1:]
        else:
            out = out.replace(old, new)
    return out[:-1]


def to_checkpoint(arch: Arch, name: str) -> str:
    """The checkpoint's name of a tensor or module the model in memory calls `name`."""
    return _rename(name, arch.checkpoint_names) if arch.checkpoint_names else name


def from_checkpoint(arch: Arch, name: str) -> str:
    """The in-memory name of a tensor or module the checkpoint calls `name`."""
    return _rename(name, [(new, old) for old, new in reversed(arch.checkpoint_names)]) if arch.checkpoint_names \
        else name


def arch_for(config) -> Arch:
    """The record for `config.model_type`, or an error listing the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise LiteError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))} "
            "(to add one, give it a record in lite/archs.py)"
        )
    arch = ARCHS[model_type]
    if model_type == "doge" and getattr(config, "is_moe", False):
        raise LiteError("doge with is_moe (its cross-domain MoE: expert embeddings picked by product keys) is not "
                        "supported; lite quantizes dense doge models")
    if model_type in ("deepseek_v2", "deepseek_v3") and getattr(config, "q_lora_rank", None) is None:
        arch = _DEEPSEEK_V3_NO_Q_LORA
    if arch.experts is None:
        return arch
    dense = dense_blocks(config)
    if dense and arch.dense is None:
        raise LiteError(f"this {model_type} model mixes dense and MoE layers (dense: {sorted(dense)}); lite "
                        f"quantizes {model_type} models only when every layer is MoE")
    arch = arch.for_experts(num_experts(config))
    return replace(arch, dense_blocks=frozenset(dense)) if dense else arch


def dense_blocks(config) -> set[int]:
    """The blocks of a MoE config that have a dense MLP, by the rules of transformers' decoder layers."""
    n = config.num_hidden_layers
    if isinstance(getattr(config, "first_k_dense_replace", None), int):
        return set(range(min(config.first_k_dense_replace, n)))
    only, step = getattr(config, "mlp_only_layers", None) or [], getattr(config, "decoder_sparse_step", None) or 1
    return {i for i in range(n) if i in only or (i + 1) % step != 0}


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
    if arch.layer_norm:
        return []
    return [pair.norm for pair in arch.norm_pairs if not any(name in arch.keep_float for name in pair.linears)]


def float_linears(model) -> list[str]:
    """Names of every nn.Linear of the model still in float (after a swap: `lm_head`, float readers)."""
    import torch.nn as nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def float_in_blocks(model) -> list[str]:
    """The modules inside the blocks that the record keeps float (routers, `shared_expert_gate`), under the
    checkpoint's names (lmdeploy's `modules_to_not_convert`)."""
    arch = arch_for(model.config)
    layers = model.get_submodule(arch.blocks)
    return [to_checkpoint(arch, f"{arch.blocks}.{i}.{name}") for i in range(len(layers))
            for name in arch.of_block(i).keep_float]


def unquantized(model) -> list[str]:
    """What a checkpoint lists as left in float, under its own names: every float linear and every float
    reader in the blocks (a router may be a bare weight that a serving engine still builds as a linear)."""
    arch = arch_for(model.config)
    listed = {from_checkpoint(arch, name) for name in float_in_blocks(model)} | set(float_linears(model))
    return [to_checkpoint(arch, name) for name, _ in model.named_modules() if name in listed]


def check_record(arch: Arch, model) -> None:
    """Refuse a model the record does not describe, naming the first module that is missing or of the
    wrong kind (instead of a KeyError deep in a stage): the embeddings, blocks, final norm and lm_head,
    and in the first block of each kind (dense, MoE) every norm and linear the record names, the linears
    reading a norm as wide as it."""
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
    firsts = {}  # the first block of each record (dense and MoE blocks of a model mixing them)
    for i in range(len(blocks)):
        firsts.setdefault(id(arch.of_block(i)), i)
    for i in firsts.values():
        _check_block(arch.of_block(i), blocks[i], f"block {arch.blocks}.{i}", get, fail)


def _check_block(arch: Arch, block, where: str, get, fail) -> None:
    import torch.nn as nn

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
