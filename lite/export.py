"""Quantize a model in memory, write it as an lmdeploy `smooth_quant` checkpoint, and read it back.

Layout (see FORMATS.md): every linear inside the decoder blocks becomes a QLinear with `weight`
(int8 or float8_e4m3fn, `(out, in)`), `scale` (fp32 `(out, 1)`), `bias` (model dtype) and, with
migration scales exported, `migration_scale` (fp32 `(in,)`). The norms feeding them become
QRMSNorm (their `weight` stays in the model dtype). Embeddings, final norm and `lm_head` are untouched.
"""

import copy
import json
import os
import shutil

import torch
import torch.nn as nn
from safetensors.torch import load_file
from tqdm.auto import tqdm

from lite.archs import Arch, arch_for, float_in_blocks, from_checkpoint, quantized_linears, quantizing_norms, \
    to_checkpoint
from lite.errors import LiteError
from lite.folders import staged_folder, write_marker
from lite.model import decoder_blocks
from lite.moe import unfuse_experts_
from lite.qmodules import QLinear, QRMSNorm
from lite.quant import quant_dtype_of
from lite.records import block_w8a8_records
from lite.shards import ShardWriter

QUANT_METHOD = "smooth_quant"
# Files copied next to the weights so that the folder loads like the original.
AUX_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def quantization_config(quant_dtype: str, export_migration_scale: bool, keep_float: list[str] = ()) -> dict:
    """lmdeploy's `smooth_quant` config; `keep_float`: the float modules inside the blocks (routers)."""
    qc = {"quant_method": QUANT_METHOD, "quant_dtype": str(quant_dtype_of(quant_dtype)).removeprefix("torch.")}
    if export_migration_scale:
        qc["migration_scale"] = True
    if keep_float:
        qc["modules_to_not_convert"] = list(keep_float)  # under the checkpoint's names
    return qc


def realize_(block: nn.Module, prefix: str, arch: Arch, records: dict) -> None:
    """lmdeploy's modules for one block's records (`lite.records`), in place: a QLinear per record and,
    unless the records keep migration scales, the norms feeding them as QRMSNorms (lmdeploy quantizes
    per token inside its fused norm)."""
    arch = arch.at(prefix)
    if not any(r.migration_scale is not None for r in records.values()):
        qdtype = next(iter(records.values())).codes.dtype
        for norm in quantizing_norms(arch):
            block.set_submodule(norm, QRMSNorm.from_norm(block.get_submodule(norm), arch.norm_offset, qdtype))
    for name, record in records.items():
        block.set_submodule(name, QLinear.from_record(record))


@torch.no_grad()
def quantize_block_(block: nn.Module, prefix: str, arch: Arch, config, qdtype: torch.dtype,
                    scales: dict[str, torch.Tensor], export_migration_scale: bool) -> None:
    """Swap one block's linears for QLinears and its feeding norms for QRMSNorms, in place.

    Scales are folded into producers, or, with `export_migration_scale`, stored on every QLinear
    (ones where a linear is not smoothed) and the norms stay float.
    """
    realize_(block, prefix, arch, block_w8a8_records(block, prefix, arch, config, qdtype, scales,
                                                     export_migration_scale))


def quantize_model_(model: nn.Module, quant_dtype: str, scales: dict[str, torch.Tensor] | None,
                    export_migration_scale: bool, progress: bool = True) -> nn.Module:
    """Quantize every decoder block of `model` in place; returns the model."""
    arch, qdtype = arch_for(model.config), quant_dtype_of(quant_dtype)
    blocks = decoder_blocks(model, arch)
    for prefix, block in tqdm(blocks.items(), desc="quantize", unit="block", disable=not progress):
        quantize_block_(block, prefix, arch, model.config, qdtype, scales or {}, export_migration_scale)
    model.config.quantization_config = quantization_config(quant_dtype, export_migration_scale, float_in_blocks(model))
    return model


def quantized_skeleton(model: nn.Module, quant_dtype: str, export_migration_scale: bool = False,
                       qrmsnorm: bool = True, input_scale: bool = False) -> nn.Module:
    """A meta copy of `model` with the modules a checkpoint holds: every linear in the blocks a QLinear
    and, for lmdeploy's layout (`qrmsnorm`, without migration scales), the norms feeding them QRMSNorms
    (the same swap `load_quantized` does)."""
    qmodel, arch, qdtype = copy.deepcopy(model).to("meta"), arch_for(model.config), quant_dtype_of(quant_dtype)
    for prefix, block in decoder_blocks(qmodel, arch).items():
        if qrmsnorm and not export_migration_scale:
            for name in quantizing_norms(arch.at(prefix)):
                norm = block.get_submodule(name)
                block.set_submodule(name, QRMSNorm(norm.weight.shape[0], 1e-6, arch.norm_offset, qdtype,
                                                   norm.weight.dtype, device="meta"))
        for name in quantized_linears(arch.at(prefix), block):
            linear = block.get_submodule(name)
            block.set_submodule(name, QLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                              qdtype, linear.weight.dtype, export_migration_scale, device="meta",
                                              input_scale=input_scale))
    return qmodel


def output_layout(qmodel: nn.Module, rename=lambda name: name) -> list:
    """`[(name, shape, dtype)]` of the checkpoint `write_checkpoint` writes for a quantized skeleton, in its
    order, under the format's names (`rename`); a tied lm_head is left out as `checkpoint_tensors` does."""
    tied = getattr(qmodel.config, "tie_word_embeddings", False)
    lm_head = f"{arch_for(qmodel.config).lm_head}.weight"
    return [(rename(name), tuple(t.shape), t.dtype) for name, t in qmodel.state_dict().items()
            if not (tied and name == lm_head)]


class CheckpointWriter:
    """A checkpoint of a model quantized block by block: every tensor written at its final offset in the
    output shards as it arrives (`write`, under the model's own names), then config.json with
    `quantization_config`, the tokenizer files and lite's marker (`close`).

    `qmodel` is the quantized meta skeleton the layout is planned from (`quantized_skeleton`);
    `realize(block, prefix, arch, records)` builds the format's modules from a block's quantization
    records (`realize_`); `rename` maps a state-dict name to the format's (compressed-tensors: `scale`
    -> `weight_scale`).
    """

    def __init__(self, folder: str, qmodel: nn.Module, quantization_config: dict, max_shard_size,
                 dtype: torch.dtype, tokenizer, source_folder: str | None, marker: tuple | None,
                 realize=None, rename=lambda name: name):
        arch = self.arch = arch_for(qmodel.config)
        self.folder, self.qmodel, self.dtype, self.tokenizer = folder, qmodel, dtype, tokenizer
        self._realize = realize
        self.source_folder, self.quantization_config, self.marker = source_folder, quantization_config, marker
        self.rename = lambda name: to_checkpoint(arch, rename(name))  # the checkpoint's own names
        self.shards = ShardWriter(folder, output_layout(qmodel, self.rename), parse_size(max_shard_size))

    def realize_(self, block) -> None:
        """Turn the records a step left on `block` (a `lite.steps.Block`) into the format's modules, which
        the sweep then writes (`write`) under the format's names."""
        self._realize(block.module, block.prefix, self.arch, block.records)

    def wants(self, name: str) -> bool:
        return self.rename(name) in self.shards.where

    def write(self, name: str, t: torch.Tensor, row_start: int = 0) -> None:
        self.shards.write(self.rename(name), t, row_start=row_start)

    def close(self) -> None:
        """The index, config.json (with the quantization config), the tokenizer files and the marker (if given)."""
        self.shards.close()
        config = copy.deepcopy(self.qmodel.config)
        config.quantization_config = self.quantization_config
        write_model_files(self.folder, config, self.dtype, self.tokenizer, self.source_folder,
                          getattr(self.qmodel, "generation_config", None))
        if self.marker is not None:
            write_marker(self.folder, *self.marker)


def streaming_writer(folder: str, model: nn.Module, quant_dtype: str, export_migration_scale: bool, max_shard_size,
                     dtype: torch.dtype, tokenizer, source_folder: str | None, marker: tuple | None) -> CheckpointWriter:
    """The lmdeploy `smooth_quant` layout of `model` (a skeleton), written as blocks arrive."""
    return CheckpointWriter(folder, quantized_skeleton(model, quant_dtype, export_migration_scale),
                            quantization_config(quant_dtype, export_migration_scale, float_in_blocks(model)),
                            max_shard_size, dtype, tokenizer, source_folder, marker, realize_)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB'."""
    if isinstance(size, int):
        return size
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = str(size).strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    if text.isdigit():
        return int(text)
    if text.startswith("-") and text[1:].isdigit():
        return int(text)
    raise LiteError(f"--max-shard-size {size!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to write: contiguous CPU tensors, a tied `lm_head` left out."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    arch = arch_for(model.config)
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == f"{arch.lm_head}.weight":
            continue
        out[name] = t.detach().cpu().contiguous()
    return out


def write_shards(tensors: dict[str, torch.Tensor], folder: str, max_shard_size: int) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` plus an index when over one shard."""
    writer = ShardWriter(folder, [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()], max_shard_size)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()


def write_checkpoint(model: nn.Module, tokenizer, source_folder: str | None, out_dir: str,
                     max_shard_size: int | str = "5GB", tensors: dict[str, torch.Tensor] | None = None,
                     marker: tuple[str, dict] | None = None) -> None:
    """Write a quantized model to `out_dir` atomically: a temporary sibling folder renamed into place.

    `tensors` replaces the model's state dict when a format names tensors differently. `marker`
    (work dir, export settings) is written into the folder as lite's marker (lite/folders.py).
    """
    arch = arch_for(model.config)
    tensors = checkpoint_tensors(model) if tensors is None else tensors
    with staged_folder(out_dir) as tmp:
        write_shards({to_checkpoint(arch, name): t for name, t in tensors.items()}, tmp, parse_size(max_shard_size))
        write_model_files(tmp, model.config, next(model.parameters()).dtype, tokenizer, source_folder,
                          getattr(model, "generation_config", None))
        if marker is not None:
            write_marker(tmp, *marker)


def write_model_files(folder: str, config, dtype: torch.dtype, tokenizer, source_folder: str | None,
                      generation_config=None) -> None:
    """config.json (with `dtype`) and the tokenizer files: copied from the source folder, else saved."""
    config = config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if source_folder:
        for name in AUX_FILES:
            if os.path.isfile(os.path.join(source_folder, name)):
                shutil.copy2(os.path.join(source_folder, name), folder)
    else:
        tokenizer.save_pretrained(folder)
        if generation_config is not None:
            generation_config.save_pretrained(folder)


def read_state_dict(folder: str, arch: Arch | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, under the model's in-memory names when `arch` is given."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(folder, name)))
    return tensors if arch is None else {from_checkpoint(arch, name): t for name, t in tensors.items()}


def quant_method_of(folder: str) -> str | None:
    """`quantization_config.quant_method` of a model folder, or None for a float model or a hub id."""
    path = os.path.join(str(folder), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return (json.load(f).get("quantization_config") or {}).get("quant_method")


def float_model_of_checkpoint(folder: str, quant_method: str, device=None) -> tuple[nn.Module, dict, torch.dtype]:
    """(float model built from the folder's config, its quantization_config, the model dtype), after
    checking that the folder is a `quant_method` checkpoint. The caller swaps in quantized modules.
    `device="meta"`: a skeleton, for reading the folder block by block."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise LiteError(f"{folder} is not a model folder (no config.json)")
    with open(path) as f:
        qc = json.load(f).get("quantization_config") or {}
    if qc.get("quant_method") != quant_method:
        raise LiteError(f"{folder} is not a {quant_method} checkpoint (quantization_config: {qc})")
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype or "float32"))
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return unfuse_experts_(model, arch_for(config)), qc, dtype


def load_quantized(folder: str) -> nn.Module:
    """Read a folder written by `write_checkpoint` back into a model that computes the quantized outputs."""
    model, qc, _ = reader_structure(folder)
    return load_checkpoint_state_(model, read_state_dict(folder, arch_for(model.config)), qc, folder)


def reader_structure(folder: str, device=None) -> tuple[nn.Module, dict, torch.dtype]:
    """The model `load_quantized` fills, QRMSNorms and QLinears in place, before any tensor is read
    (`device="meta"`: a skeleton); with its quantization_config and dtype. The folder names every tensor as
    the model does (`to_checkpoint`)."""
    model, qc, dtype = float_model_of_checkpoint(folder, QUANT_METHOD, device)
    arch = arch_for(model.config)
    qdtype = getattr(torch, qc["quant_dtype"])
    migration = bool(qc.get("migration_scale"))
    for prefix, block in decoder_blocks(model, arch).items():
        if not migration:
            for norm in quantizing_norms(arch.at(prefix)):
                block.set_submodule(norm, QRMSNorm.from_norm(block.get_submodule(norm), arch.norm_offset, qdtype))
        for name in quantized_linears(arch.at(prefix), block):
            linear = block.get_submodule(name)
            block.set_submodule(name, QLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                              qdtype, dtype, migration, device=linear.weight.device))
    return model, qc, dtype


def load_checkpoint_state_(model: nn.Module, state: dict[str, torch.Tensor], qc: dict, folder: str) -> nn.Module:
    """Load a checkpoint's tensors into a model whose quantized modules are in place; ties a tied lm_head."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [m for m in missing if m != f"{arch_for(model.config).lm_head}.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise LiteError(f"{folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.config.quantization_config = qc
    return model
