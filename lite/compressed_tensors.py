"""The compressed-tensors checkpoint format (what vLLM, SGLang and transformers read), written and read
with torch and safetensors only.

Layout (FORMATS.md): one config group targeting every `Linear` except those named in `ignore`
(`lm_head`, routers). Each quantized linear stores `weight` (int8 or float8_e4m3fn, `(out, in)`),
`weight_scale` (fp32 `(out, 1)`, one per output channel) and, for static activations,
`input_scale` (fp32 `(1,)`). Norms stay plain RMSNorms: SmoothQuant factors are folded into the
norms and producing linears before quantization, as engines expect.

Scales follow lmdeploy and vLLM's run-time kernels: `absmax / 127` (448 for fp8), values clamped to
[-128, 127]. compressed-tensors' own observers use `absmax / 127.5`; either dequantizes correctly
because the scale travels with the weights. Dynamic per-token activation scales are computed by the
engine (vLLM: `absmax / 127`, transformers' emulation: `absmax / 127.5`), so logits from
transformers differ from lite's and vLLM's by that grid difference, a fraction of one int8 step.
"""

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from lite.archs import arch_for, float_linears, from_checkpoint, unquantized
from lite.errors import LiteError
from lite.model import decoder_blocks
from lite.observers import ActSettings
from lite.qmodules import QLinear
from lite.quant import quant_dtype_of
from lite.records import block_w8a8_records
from lite.smooth import check_finite, fold_scales_

QUANT_METHOD = "compressed-tensors"
# The only keys a quantization-args dict may hold: readers reject unknown keys.
ARG_KEYS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "observer",
            "block_structure", "actorder")
FORMAT_OF = {torch.int8: "int-quantized", torch.float8_e4m3fn: "float-quantized"}
QDTYPE_OF = {("int", 8): torch.int8, ("float", 8): torch.float8_e4m3fn}


def quant_args(qdtype: torch.dtype, strategy: str, dynamic: bool, observer: str | None = None,
               symmetric: bool = True, group_size: int | None = None) -> dict:
    """One quantization-args dict with exactly the keys of `ARG_KEYS`."""
    return {"num_bits": 8, "type": "int" if qdtype == torch.int8 else "float", "symmetric": symmetric,
            "strategy": strategy, "group_size": group_size, "dynamic": dynamic, "observer": observer,
            "block_structure": None, "actorder": None}


def scheme_args(quant_dtype: str, act: ActSettings) -> tuple[dict, dict]:
    """(weights, input_activations) args of lite's W8A8 schemes: weights per channel, inputs per token
    (dynamic) or per tensor (static)."""
    qdtype = quant_dtype_of(quant_dtype)
    weights = quant_args(qdtype, "channel", False, "minmax")
    if act.static:
        return weights, quant_args(qdtype, "tensor", False, act.act_observer)
    return weights, quant_args(qdtype, "token", True)


def check_vllm_loadable(weights: dict, input_activations: dict | None, fmt: str | None = None) -> None:
    """Raise unless vLLM has a kernel for this scheme (FORMATS.md, "What vLLM accepts").

    `weights` and `input_activations` are quantization-args dicts as written to `config_groups`
    (`input_activations` None for weight-only); `fmt` the group's format, when known.
    """
    for role, args in (("weights", weights), ("input_activations", input_activations)):
        unknown = sorted(set(args or {}) - set(ARG_KEYS))
        if unknown:
            raise LiteError(f"{role} args hold keys {unknown} that compressed-tensors readers reject; "
                            f"allowed: {', '.join(ARG_KEYS)}")
    w, a = weights, input_activations
    w_kind = (w.get("type"), w.get("num_bits"))
    w_strategy, w_sym = w.get("strategy"), w.get("symmetric", True)
    if a is None:
        if w_kind not in (("int", 4), ("int", 8)) or w_strategy not in ("channel", "group"):
            raise LiteError(f"vLLM's weight-only kernels need int4/int8 weights per channel or group, got "
                            f"{w_kind[0]}{w_kind[1]} strategy {w_strategy!r}")
        if fmt not in (None, "pack-quantized"):
            raise LiteError(f"vLLM reads weight-only int4/int8 from format pack-quantized, not {fmt!r}")
        return
    a_kind, a_strategy, a_dynamic = (a.get("type"), a.get("num_bits")), a.get("strategy"), a.get("dynamic")
    if w_kind == ("int", 8):
        if not w_sym:
            raise LiteError("asymmetric int8 weights have no vLLM W8A8 kernel (CompressedTensorsW8A8Int8 "
                            "needs symmetric weights); use symmetric weights")
        if w_strategy not in ("tensor", "channel"):
            raise LiteError(f"int8 weights with strategy {w_strategy!r} and activation quantization have no vLLM "
                            "kernel; use strategy channel or tensor (group-wise int8 only works weight-only)")
        if a_kind != ("int", 8):
            raise LiteError(f"int8 weights need int8 input activations in vLLM, got {a_kind[0]}{a_kind[1]}")
        if not ((a_strategy == "token" and a_dynamic is True) or (a_strategy == "tensor" and a_dynamic is False)):
            raise LiteError(f"vLLM's int8 W8A8 takes inputs per token dynamic or per tensor static, got "
                            f"strategy {a_strategy!r} dynamic {a_dynamic!r}")
        expected_fmt = "int-quantized"
    elif w_kind == ("float", 8):
        if not w_sym or w_strategy not in ("tensor", "channel", "block"):
            raise LiteError(f"vLLM's fp8 W8A8 needs symmetric fp8 weights per tensor, channel or block, got "
                            f"symmetric {w_sym} strategy {w_strategy!r}")
        if a_kind != ("float", 8) or not a.get("symmetric", True):
            raise LiteError(f"fp8 weights need symmetric fp8 input activations in vLLM, got "
                            f"{a_kind[0]}{a_kind[1]} symmetric {a.get('symmetric')}")
        if not (a_dynamic is True and a_strategy in ("token", "tensor")) and \
                not (a_dynamic is False and a_strategy == "tensor"):
            raise LiteError(f"vLLM's fp8 W8A8 takes inputs dynamic (token or tensor) or static per tensor, got "
                            f"strategy {a_strategy!r} dynamic {a_dynamic!r}")
        expected_fmt = "float-quantized"
    else:
        raise LiteError(f"vLLM has no W{w_kind[1]}A{a_kind[1]} kernel for {w_kind[0]} weights with activation "
                        "quantization; use int8 or fp8 weights")
    if fmt not in (None, expected_fmt):
        raise LiteError(f"this scheme is stored as format {expected_fmt!r}, not {fmt!r}")


def quantization_config(weights: dict, input_activations: dict | None, ignore: list[str], fmt: str) -> dict:
    group = {"targets": ["Linear"], "weights": weights, "input_activations": input_activations,
             "output_activations": None, "format": fmt}
    return {"quant_method": QUANT_METHOD, "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ignore, "kv_cache_scheme": None}


def ct_name(name: str, qlinears) -> str:
    """A state-dict name under compressed-tensors' names: a QLinear's `scale` is its `weight_scale`."""
    module, _, leaf = name.rpartition(".")
    return f"{module}.weight_scale" if module in qlinears and leaf == "scale" else name


def realize_(block: nn.Module, prefix: str, arch, records: dict) -> None:
    """compressed-tensors' modules for one block's W8A8 records (`lite.records`), in place: a QLinear per
    record (with its static input scale, when it has one). Norms stay plain modules."""
    for name, record in records.items():
        block.set_submodule(name, QLinear.from_record(record))


@torch.no_grad()
def quantize_block_(block: nn.Module, prefix: str, arch, config, qdtype: torch.dtype,
                    scales: dict[str, torch.Tensor], input_scales: dict[str, torch.Tensor] | None = None) -> None:
    """Fold a block's SmoothQuant factors into its norms and producers and swap its linears for QLinears
    (with their static `input_scales`, when given), in place. Norms stay plain modules."""
    realize_(block, prefix, arch, block_w8a8_records(block, prefix, arch, config, qdtype, scales,
                                                     input_scales=input_scales))


def streaming_writer(folder: str, model: nn.Module, quant_dtype: str, max_shard_size, dtype: torch.dtype, tokenizer,
                     source_folder: str | None, marker: tuple | None, act: ActSettings = ActSettings()):
    """The compressed-tensors layout of `model` (a skeleton), per-token or static activations (`act`),
    written as blocks arrive."""
    from lite import export

    qmodel = export.quantized_skeleton(model, quant_dtype, qrmsnorm=False, input_scale=act.static)
    qlinears = {name for name, module in qmodel.named_modules() if isinstance(module, QLinear)}
    weights, inputs = scheme_args(quant_dtype, act)
    config = quantization_config(weights, inputs, unquantized(qmodel), FORMAT_OF[quant_dtype_of(quant_dtype)])
    return export.CheckpointWriter(folder, qmodel, config, max_shard_size, dtype, tokenizer, source_folder, marker,
                                   realize_, rename=lambda name: ct_name(name, qlinears))


@torch.no_grad()
def quantize_model_(model: nn.Module, quant_dtype: str, scales: dict[str, torch.Tensor] | None, act: ActSettings,
                    tokens: torch.Tensor | None = None, batch_size: int = 4, device="cpu",
                    progress: bool = True) -> nn.Module:
    """Fold SmoothQuant factors into norms and producers, calibrate static input scales on the smoothed
    model when `act` is static, and swap every linear in the blocks for a QLinear; returns the model.

    Norms stay plain modules. `tokens` (calibration windows) are needed only for static scales.
    """
    arch, qdtype = arch_for(model.config), quant_dtype_of(quant_dtype)
    weights, inputs = scheme_args(quant_dtype, act)
    fmt = FORMAT_OF[qdtype]
    check_vllm_loadable(weights, inputs, fmt)
    blocks = decoder_blocks(model, arch)
    if not act.static:
        for prefix, block in tqdm(blocks.items(), desc="quantize", unit="block", disable=not progress):
            quantize_block_(block, prefix, arch, model.config, qdtype, scales or {})
        model.config.quantization_config = quantization_config(weights, inputs, unquantized(model), fmt)
        return model
    # Static: the whole model smoothed first, so that the scales describe what the quantized linears read.
    for prefix, block in blocks.items():
        for name, p in block.named_parameters():
            check_finite(f"{prefix}.{name}", p.detach(), "weight")
        fold_scales_(block, prefix, arch, model.config, scales or {})
    if tokens is None:
        raise LiteError("static activation scales need calibration tokens")
    from lite.steps.static_scales import static_input_scales

    input_scales = static_input_scales(model, arch, tokens, batch_size, device, act, qdtype, progress)
    for prefix, block in tqdm(blocks.items(), desc="quantize", unit="block", disable=not progress):
        quantize_block_(block, prefix, arch, model.config, qdtype, {}, input_scales)  # factors folded above
    model.config.quantization_config = quantization_config(weights, inputs, unquantized(model), fmt)
    return model


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under compressed-tensors names: each QLinear's `scale` becomes `weight_scale`."""
    from lite import export

    qlinears = {}
    for name, module in model.named_modules():
        if isinstance(module, QLinear):
            if module.migration_scale is not None:
                raise LiteError(f"{name} carries a migration_scale, which compressed-tensors cannot store")
            qlinears[name] = module
    return {ct_name(name, qlinears): t for name, t in export.checkpoint_tensors(model).items()}


def write_checkpoint(model: nn.Module, tokenizer, source_folder: str | None, out_dir: str,
                     max_shard_size: int | str = "5GB", marker: tuple[str, dict] | None = None) -> None:
    """Write a model quantized by `quantize_model_` as a compressed-tensors folder, atomically."""
    from lite import export

    export.write_checkpoint(model, tokenizer, source_folder, out_dir, max_shard_size,
                            tensors=checkpoint_tensors(model), marker=marker)


def _read_scheme(folder: str, qc: dict) -> tuple[dict, dict | None]:
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise LiteError(f"{folder}: lite reads compressed-tensors folders with one config group, found {len(groups)}")
    group = next(iter(groups.values()))
    if group.get("targets") != ["Linear"]:
        raise LiteError(f"{folder}: lite reads config groups targeting ['Linear'], found {group.get('targets')}")
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    readable = (QDTYPE_OF.get((weights.get("type"), weights.get("num_bits"))) is not None
                and weights.get("symmetric", True) and weights.get("strategy") in ("channel", "tensor")
                and inputs is not None and inputs.get("type") == weights.get("type")
                and inputs.get("symmetric", True)
                and ((inputs.get("strategy") == "token" and inputs.get("dynamic") is True)
                     or (inputs.get("strategy") == "tensor" and inputs.get("dynamic") is False)))
    if not readable:
        raise LiteError(f"{folder}: lite reads symmetric int8/fp8 W8A8 (weights per channel or tensor, inputs per "
                        f"token dynamic or per tensor static); this folder has weights {weights}, inputs {inputs}")
    return weights, inputs


def load_compressed_tensors(folder: str) -> nn.Module:
    """Read a compressed-tensors W8A8 folder into a model of QLinears that computes what vLLM computes."""
    from lite.export import load_checkpoint_state_, read_state_dict

    model, qc, _ = reader_structure(folder)
    quantized = {name for name, m in model.named_modules() if isinstance(m, QLinear)}
    state = {}
    for name, t in read_state_dict(folder, arch_for(model.config)).items():
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight_scale":
            name = f"{module}.scale"
        state[name] = reader_tensor(model, quantized, name, t)
    return load_checkpoint_state_(model, state, qc, folder)


def reader_structure(folder: str, device=None) -> tuple[nn.Module, dict, torch.dtype]:
    """The model `load_compressed_tensors` fills, QLinears in place of every linear not in `ignore`, before
    any tensor is read (`device="meta"`: a skeleton); with its quantization_config and dtype. A QLinear's
    `scale` is stored as `weight_scale` (`ct_name`) and goes through `reader_tensor`."""
    from lite.export import float_model_of_checkpoint

    model, qc, dtype = float_model_of_checkpoint(folder, QUANT_METHOD, device)
    weights, inputs = _read_scheme(folder, qc)
    qdtype, static = QDTYPE_OF[(weights["type"], weights["num_bits"])], inputs["dynamic"] is False
    arch = arch_for(model.config)
    ignore = {from_checkpoint(arch, name) for name in qc.get("ignore") or []}
    for name in [name for name in float_linears(model) if name not in ignore]:
        linear = model.get_submodule(name)
        model.set_submodule(name, QLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                          qdtype, dtype, input_scale=static, device=linear.weight.device))
    return model, qc, dtype


def reader_tensor(model: nn.Module, quantized, name: str, t: torch.Tensor) -> torch.Tensor:
    """A stored tensor as the reader's model holds it: a QLinear's scale `(out, 1)` fp32 (a per-tensor
    weight scale is stored as one value), its static input scale `(1,)` fp32."""
    module, _, leaf = name.rpartition(".")
    if module in quantized and leaf == "scale":
        return t.float().reshape(-1, 1).expand(model.get_submodule(module).out_features, 1).contiguous()
    if module in quantized and leaf == "input_scale":
        return t.float().reshape(1)
    return t


def describe(qc: dict) -> str:
    """A short label such as `ct int8 static` for tables."""
    weights, inputs = _read_scheme("checkpoint", qc)
    dtype = "int8" if weights["type"] == "int" else "fp8"
    return f"ct {dtype} {'static' if inputs['dynamic'] is False else 'dynamic'}"
