"""Weight-only checkpoints (W4A16 and friends): the scheme, the three formats engines load, the checks
that refuse what an engine cannot load, the streaming writer and the reader.

| `--format` | `quant_method` | layout (FORMATS.md) | engines |
| --- | --- | --- | --- |
| `compressed-tensors` | `compressed-tensors`, format `pack-quantized` | `weight_packed`, `weight_scale`, `weight_zero_point` | vLLM, SGLang, transformers |
| `awq` | `awq` (GEMM) | `qweight`, `qzeros`, `scales` | lmdeploy TurboMind, vLLM, transformers |
| `gptq` | `gptq` (`checkpoint_format` gptq, or gptq_v2 when asymmetric) | `qweight`, `qzeros`, `scales`, `g_idx` | vLLM, GPTQModel, lmdeploy (sym, g128) |

The tensors are the buffers of `lite.qmodules.WQLinear` in the matching layout; the quantizing steps
(`rtn` with `bits`, `gptq`) leave records (`lite.records`), which the writer's `realizer(fmt)` turns
into WQLinears.
"""

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from lite.archs import arch_for, float_linears, from_checkpoint, quantized_linears, to_checkpoint, unquantized
from lite.errors import LiteError, warn
from lite.model import decoder_blocks
from lite.qmodules import WQLinear

WEIGHT_FORMATS = ("compressed-tensors", "awq", "gptq")
METHODS = ("compressed-tensors", "awq", "gptq")  # quant_method values of weight-only checkpoints


@dataclass(frozen=True)
class WeightScheme:
    """What a weight-only checkpoint promises: `bits`-bit integer weights, one scale (and zero point,
    when not `symmetric`) per `group_size` input columns (-1: per output channel)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    # Linears whose in_features `group_size` does not divide get one scale per output channel instead
    # (otherwise such a model is refused).
    channel_fallback: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LiteError(f"--w-bits must be an integer from 2 to 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size > 0):
            raise LiteError(f"--w-group-size must be a positive integer or -1 (per channel), got {self.group_size!r}")

    def for_linear(self, in_features: int) -> "WeightScheme":
        """The scheme one linear gets: per channel where the group size does not divide its inputs and
        `channel_fallback` allows it (the shapes were checked before any work)."""
        if self.group_size == -1 or in_features % self.group_size == 0 or not self.channel_fallback:
            return self
        return WeightScheme(self.bits, -1, self.symmetric)

    def record(self) -> dict:
        return asdict(self)


def layout_of(fmt: str, scheme: WeightScheme) -> str:
    """The WQLinear layout `fmt` stores: GPTQ's original format for symmetric weights (every reader
    takes it), gptq_v2 for asymmetric ones (the original stores zero − 1, which readers that do not
    mask the sum get wrong for a zero of 0)."""
    if fmt == "compressed-tensors":
        return "pack-quantized"
    if fmt == "gptq":
        return "gptq" if scheme.symmetric else "gptq_v2"
    return fmt


def scale_dtype_of(fmt: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the format stores scales in: fp16 for AWQ and GPTQ, the model's for compressed-tensors."""
    return model_dtype if fmt == "compressed-tensors" else torch.float16


def scale_dtype_setting(fmt: str) -> str:
    """The quantizing steps' `scale_dtype` setting for `fmt` (`scale_dtype_of` as a name)."""
    return "model" if fmt == "compressed-tensors" else "float16"


def check_weight_format(fmt: str, scheme: WeightScheme) -> None:
    """Refuse, before any work, what `fmt`'s engines cannot load, naming the option to change; warn
    (one line on stderr) where an engine loads the checkpoint only slowly or not at all."""
    if fmt not in WEIGHT_FORMATS:
        raise LiteError(f"--format {fmt!r} is not a weight-only format; use one of: {', '.join(WEIGHT_FORMATS)}")
    bits, g = scheme.bits, scheme.group_size
    if scheme.channel_fallback and fmt != "compressed-tensors":
        raise LiteError(f"--w-channel-fallback mixes group sizes in one checkpoint, which only --format "
                        f"compressed-tensors stores (--format {fmt} has one group size)")
    if fmt == "awq":
        if bits != 4:
            raise LiteError(f"--format awq (AutoAWQ GEMM) stores 4-bit weights only, got --w-bits {bits}; "
                            "use --format compressed-tensors or gptq")
        if g == -1:
            raise LiteError("--format awq needs groups (engines read no per-channel AWQ); pass --w-group-size 128 "
                            "or use --format compressed-tensors")
    if fmt == "gptq" and bits not in (2, 4, 8):
        raise LiteError(f"--format gptq: lite writes 2, 4 or 8 bits (3-bit GPTQ packing differs between readers), "
                        f"got --w-bits {bits}; use --format compressed-tensors for {bits} bits")
    if fmt == "gptq" and not scheme.symmetric:
        warn("asymmetric GPTQ is written with checkpoint_format gptq_v2; vLLM's fast Marlin kernel takes symmetric "
             "weights only and falls back to a slower kernel (pass --w-sym true for Marlin)")
    if fmt == "compressed-tensors" and bits not in (4, 8):
        warn(f"vLLM's weight-only kernels take 4 or 8 bits; this {bits}-bit checkpoint loads in transformers "
             "(compressed-tensors) but not in vLLM")


def check_weight_shapes(fmt: str, scheme: WeightScheme, model: nn.Module) -> None:
    """Refuse a model (a meta skeleton is enough) whose linears `fmt` cannot store with `scheme`, naming
    the first one and the option to change."""
    bits, g = scheme.bits, scheme.group_size
    arch = arch_for(model.config)
    for prefix, block in decoder_blocks(model, arch).items():
        for name in quantized_linears(arch, block):
            linear = block.get_submodule(name)
            fqn, (out_features, in_features) = f"{prefix}.{name}", linear.weight.shape
            if g != -1 and in_features % g and not scheme.channel_fallback:
                raise LiteError(f"{fqn} has {in_features} inputs, not a multiple of --w-group-size {g}; pass a "
                                f"group size that divides it, -1 (per channel), or --w-channel-fallback (per "
                                "channel for such linears only)")
            per_word = 8 if fmt == "awq" else 32 // bits  # AWQ packs 4-bit codes; GPTQ's zero points `bits` each
            if fmt in ("awq", "gptq") and out_features % per_word:
                raise LiteError(f"--format {fmt} packs {per_word} outputs per word, but {fqn} has {out_features} "
                                "outputs; use --format compressed-tensors")
            if fmt == "gptq" and in_features * bits % 32:
                raise LiteError(f"--format gptq packs {32 // bits} inputs per word, but {fqn} has {in_features} "
                                "inputs; use --format compressed-tensors")


def quantization_config(fmt: str, scheme: WeightScheme, ignore: list[str], observer: str = "minmax",
                        split: tuple[list[str], list[str]] | None = None) -> dict:
    """`config.json`'s `quantization_config` for `fmt` (keys as FORMATS.md lists them). `split`: (grouped,
    per-channel) linear names when `channel_fallback` left some per channel; compressed-tensors then gets
    two config groups, each naming its linears exactly (readers match exact module names)."""
    if fmt == "compressed-tensors":
        from lite.compressed_tensors import quant_args, quantization_config as ct_config

        def weights(s: WeightScheme) -> dict:
            return {**quant_args(torch.int8, "channel" if s.group_size == -1 else "group", False, observer,
                                 s.symmetric, None if s.group_size == -1 else s.group_size), "num_bits": s.bits}

        qc = ct_config(weights(scheme), None, ignore, "pack-quantized")
        if split is not None and split[1]:
            group = qc["config_groups"]["group_0"]
            qc["config_groups"] = {
                "group_0": {**group, "targets": list(split[0])},
                "group_1": {**group, "targets": list(split[1]),
                            "weights": weights(WeightScheme(scheme.bits, -1, scheme.symmetric))}}
        return qc
    if fmt == "awq":
        return {"quant_method": "awq", "version": "gemm", "bits": scheme.bits, "group_size": scheme.group_size,
                "zero_point": True, "modules_to_not_convert": ignore or None}
    return {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size, "desc_act": False,
            "sym": scheme.symmetric, "checkpoint_format": layout_of(fmt, scheme), "lm_head": False}


def swap_skeleton_(model: nn.Module, fmt: str, scheme: WeightScheme, dtype: torch.dtype, device="meta") -> nn.Module:
    """Every quantized linear of the blocks replaced by an empty WQLinear of `fmt`'s layout, in place."""
    arch, layout = arch_for(model.config), layout_of(fmt, scheme)
    for block in decoder_blocks(model, arch).values():
        for name in quantized_linears(arch, block):
            linear = block.get_submodule(name)
            own = scheme.for_linear(linear.in_features)
            block.set_submodule(name, WQLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                               own.bits, own.group_size, own.symmetric, layout,
                                               scale_dtype_of(fmt, dtype), device=device))
    return model


def realizer(fmt: str):
    """`fmt`'s `realize(block, prefix, arch, records)`: a WQLinear of its layout per weight-only record
    (`lite.records`) of the block, in place; scales stored in the format's scale dtype."""
    def realize_(block: nn.Module, prefix: str, arch, records: dict) -> None:
        for name, record in records.items():
            layout = layout_of(fmt, WeightScheme(record.bits, record.group_size, record.zero is None))
            block.set_submodule(name, WQLinear.from_record(record, layout, scale_dtype_of(fmt, record.dtype)))
    return realize_


def streaming_writer(folder: str, model: nn.Module, fmt: str, scheme: WeightScheme, max_shard_size,
                     dtype: torch.dtype, tokenizer, source_folder: str | None, marker: tuple | None,
                     observer: str = "minmax"):
    """A checkpoint writer for `model` (a skeleton) in `fmt`, written as blocks arrive."""
    from lite import export

    qmodel = swap_skeleton_(copy.deepcopy(model).to("meta"), fmt, scheme, dtype)
    arch = arch_for(model.config)
    quantized = [(to_checkpoint(arch, name), m) for name, m in qmodel.named_modules() if isinstance(m, WQLinear)]
    split = ([n for n, m in quantized if m.group_size == scheme.group_size],
             [n for n, m in quantized if m.group_size != scheme.group_size])
    config = quantization_config(fmt, scheme, unquantized(qmodel), observer, split)
    return export.CheckpointWriter(folder, qmodel, config, max_shard_size, dtype, tokenizer, source_folder, marker,
                                   realizer(fmt))


def scheme_of(qc: dict) -> tuple[str, WeightScheme] | None:
    """(`--format`, scheme) of a weight-only `quantization_config`; None when it is not one lite reads."""
    method = qc.get("quant_method")
    if method == "compressed-tensors" and qc.get("format") == "pack-quantized":
        groups = list((qc.get("config_groups") or {}).values())
        w = (groups[0] if groups else {}).get("weights") or {}
        scheme = WeightScheme(w.get("num_bits"), w.get("group_size") or -1, bool(w.get("symmetric", True)))
        if len(groups) == 1:
            return "compressed-tensors", scheme
        # lite's second group: the same scheme per channel, for the linears the group size does not divide
        second = groups[1].get("weights") or {}
        if len(groups) == 2 and second.get("strategy") == "channel" and second.get("num_bits") == scheme.bits:
            return "compressed-tensors", WeightScheme(scheme.bits, scheme.group_size, scheme.symmetric, True)
        return None
    if method == "awq":
        return "awq", WeightScheme(qc.get("bits"), qc.get("group_size"), False)
    if method == "gptq":
        if qc.get("desc_act"):
            return None  # a real group map (act-order without static groups): not written by lite
        return "gptq", WeightScheme(qc.get("bits"), qc.get("group_size"), bool(qc.get("sym", True)))
    return None


def load_weight_only(folder: str) -> nn.Module:
    """Read a weight-only folder (any of the three formats) into a model of WQLinears."""
    from lite.export import load_checkpoint_state_, read_state_dict

    model, qc, _ = reader_structure(folder)
    return load_checkpoint_state_(model, read_state_dict(folder, arch_for(model.config)), qc, folder)


def reader_structure(folder: str, device=None) -> tuple[nn.Module, dict, torch.dtype]:
    """The model `load_weight_only` fills, WQLinears of the folder's layout in place, before any tensor is
    read (`device="meta"`: a skeleton to read block by block); with its quantization_config and dtype.
    The folder stores the WQLinears' buffers under the model's names (`to_checkpoint`)."""
    from lite.export import float_model_of_checkpoint, quant_method_of

    method = quant_method_of(folder)
    model, qc, dtype = float_model_of_checkpoint(folder, method, device)
    found = scheme_of(qc)
    if found is None:
        raise LiteError(f"{folder}: lite reads weight-only checkpoints it can describe (one config group, "
                        f"desc_act false); this one has quantization_config {qc}")
    fmt, scheme = found
    layout = "gptq_v2" if method == "gptq" and qc.get("checkpoint_format") == "gptq_v2" else layout_of(fmt, scheme)
    arch = arch_for(model.config)
    ignore = {from_checkpoint(arch, name) for name in qc.get("ignore") or qc.get("modules_to_not_convert") or []}
    if method == "awq":
        # AWQ always stores zero points; symmetric AWQ is the special case zero = 2^(b-1).
        scheme = WeightScheme(scheme.bits, scheme.group_size, False, scheme.channel_fallback)
    for name in float_linears(model):
        if name in ignore or name == arch_for(model.config).lm_head:
            continue
        linear = model.get_submodule(name)
        own = scheme.for_linear(linear.in_features)
        model.set_submodule(name, WQLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                           own.bits, own.group_size, own.symmetric, layout,
                                           scale_dtype_of(fmt, dtype), device=linear.weight.device))
    return model, qc, dtype


def describe(qc: dict) -> str:
    """A short label such as `w4 g128 asym (awq)` for tables."""
    found = scheme_of(qc)
    if found is None:
        return str(qc.get("quant_method"))
    fmt, s = found
    group = "channel" if s.group_size == -1 else f"g{s.group_size}" + ("/channel" if s.channel_fallback else "")
    return f"w{s.bits} {group} {'sym' if s.symmetric else 'asym'} ({fmt})"


@torch.no_grad()
def quantize_rtn(w: torch.Tensor, scheme: WeightScheme, mse: bool, scale_dtype: torch.dtype,
                 hessian: torch.Tensor | None = None):
    """Round-to-nearest (codes, scale, zero) of a weight `(out, in)`; `mse` searches each group's clipping
    range (by the output error its inputs' `hessian` blocks `(groups, g, g)` give, when given). The scale
    is rounded to `scale_dtype` before the codes are computed with it. Codes come one byte each
    (`lite.records.compact_codes`: int8 signed when symmetric, else uint8); rows are independent, so
    they are computed `CHUNK_ELEMENTS` at a time and the fp32 temporaries stay small."""
    from lite.kernels import mse_clip
    from lite.quant import quantize_weight, row_chunks, weight_qparams

    scheme = scheme.for_linear(w.shape[1])
    groups = w.shape[1] // (w.shape[1] if scheme.group_size == -1 else scheme.group_size)
    codes = torch.empty(w.shape, dtype=torch.int8 if scheme.symmetric else torch.uint8, device=w.device)
    scale = torch.empty((w.shape[0], groups), dtype=torch.float32, device=w.device)
    zero = None if scheme.symmetric else torch.empty((w.shape[0], groups), dtype=torch.int32, device=w.device)
    for rows in row_chunks(*w.shape):
        if mse:
            s, z = mse_clip(w[rows], scheme.bits, scheme.group_size, scheme.symmetric, hessian=hessian)
        else:
            s, z = weight_qparams(w[rows], scheme.bits, scheme.group_size, scheme.symmetric)
        scale[rows] = s.to(scale_dtype).float()
        if zero is not None:
            zero[rows] = z
        codes[rows] = quantize_weight(w[rows], scale[rows], z, scheme.bits, scheme.group_size).to(codes.dtype)
    return codes, scale, zero
