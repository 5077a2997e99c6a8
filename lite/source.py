"""Where a block's weights come from: `Loaded` (a model in memory) or `Shards` (a meta skeleton whose
weights are read from the safetensors files when their block's turn comes). The sweep goes one way
through both; only these few methods differ.
"""

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn

from lite.archs import arch_for, to_checkpoint
from lite.model import LoadedModel, config_hash, decoder_blocks, load_tokenizer, move_outside_blocks_, \
    parameters_on_meta, read_config, resolve_dtype, shrunk_config
from lite.moe import Experts, FusedLayout, unfuse_experts_
from lite.shards import ShardReader


@dataclass
class StreamedModel(LoadedModel):
    """A model whose weights stay in its shards: `model` holds meta parameters and real buffers."""

    reader: ShardReader = None
    dtype: torch.dtype = None
    opened_at: float = 0.0  # perf_counter() when opening began, so that timings include it
    identity_s: float = 0.0  # seconds spent on `identity`
    # A folder in another layout than the model's own (a quantized checkpoint read back): the stored name of
    # a state-dict entry, and how a stored tensor becomes the entry `(name, tensor) -> tensor`.
    rename: object = None
    transform: object = None


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name)
    if parameter:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def stored_location(model: nn.Module, arch, reader: ShardReader, name: str, rename=None) -> tuple[str, tuple | None]:
    """(the checkpoint tensor holding the model's tensor `name`, None or `(layout, expert, projection,
    is_bias)` where it is one expert's part of a fused tensor on disk, as gpt_oss stores its experts).
    `rename`: the stored name of an entry, where the folder has a layout of its own."""
    stored = rename(name) if rename is not None else to_checkpoint(arch, name)
    found = None if stored in reader else FusedLayout.fused_name(name)
    if found is None:
        return stored, None
    fused, e, proj, bias = found
    experts = model.get_submodule(fused.rsplit(".", 1)[0])
    fused_stored = to_checkpoint(arch, fused)
    if not isinstance(experts, Experts) or fused_stored not in reader:
        return stored, None
    return fused_stored, (experts.layout, e, proj, bias)


def open_streamed(source: str, dtype: str = "auto", trust_remote_code: bool = False) -> StreamedModel | None:
    """The skeleton of a local safetensors model, or None when its blocks hold buffers we cannot rebuild."""
    from transformers import AutoModelForCausalLM

    opened_at = time.perf_counter()
    source = str(source)
    config = read_config(source, trust_remote_code)
    arch = arch_for(config)
    tokenizer = load_tokenizer(source, trust_remote_code)  # before any weight: a missing tokenizer fails fast
    reader = ShardReader(source)
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype == "auto":
        # As from_pretrained: the config's dtype, else the checkpoint's first floating-point tensor's.
        floating = [e.dtype for e in reader.entries.values() if e.dtype.is_floating_point]
        torch_dtype = config.dtype if isinstance(config.dtype, torch.dtype) else (floating[0] if floating else torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    unfuse_experts_(model.eval(), arch)  # per-expert linears: the checkpoint's own names
    inside = arch.blocks + "."
    stored_in_blocks = {name for name in model.state_dict() if name.startswith(inside)}
    if any(name.startswith(inside) and name not in stored_in_blocks for name, _ in model.named_buffers()):
        return None  # a block buffer the checkpoint does not hold: made by the model's own constructor
    # Non-persistent buffers (rotary inv_freq, Gemma's embed_scale) come from the config, not the
    # checkpoint: build the model without blocks and with a tiny vocabulary, and take them from it.
    with parameters_on_meta():
        helper = dict(AutoModelForCausalLM.from_config(shrunk_config(config, vocab_size=8), dtype=torch_dtype,
                                                       trust_remote_code=trust_remote_code).named_buffers())
    # The checkpoint's names are the model's, or the record maps them (`checkpoint_names`), or experts are
    # stored fused (`stored_location`); a checkpoint that transformers maps otherwise (other prefixes) is
    # loaded with transformers.
    tied = f"{arch.lm_head}.weight" if getattr(config, "tie_word_embeddings", False) else None
    if any(stored_location(model, arch, reader, name)[0] not in reader and name != tied
           for name, _ in model.named_parameters()):
        return None
    for name, _ in list(model.named_buffers()):
        stored = to_checkpoint(arch, name)
        if name.startswith(inside):  # persistent (DeepSeek's routing bias): read with its block
            if stored not in reader:
                return None
        elif name in helper:
            _set_tensor(model, name, helper[name].clone(), parameter=False)
        elif stored in reader:
            _set_tensor(model, name, reader.read([stored])[stored], parameter=False)
        else:
            return None
    return StreamedModel(model, tokenizer, source, source, reader, torch_dtype, opened_at)


def _source(sm: StreamedModel, name: str) -> tuple[str, tuple | None]:
    """`stored_location` of a state-dict entry (a tied lm_head reads the embeddings)."""
    if getattr(sm.config, "tie_word_embeddings", False) and name == f"{sm.arch.lm_head}.weight":
        name = f"{sm.arch.embed}.weight"
    return stored_location(sm.model, sm.arch, sm.reader, name, sm.rename)


def streamed_weights_hash(sm: StreamedModel) -> str:
    """`lite.model.weights_hash` of the loaded model, from 16 elements per tensor read off the shards
    (many small reads: in parallel, which a cold disk serves far faster than one after another)."""

    def sample(item):
        name, t = item
        numel = t.numel()
        picks = list(range(0, numel, max(1, numel // 16)))[:16]
        stored, expert = _source(sm, name)
        if expert is not None:  # the same elements, where the fused tensor holds them
            layout, e, proj, bias = expert
            picks = layout.flat_indices(sm.reader.entries[stored].shape, e, proj, bias, picks)
        values = sm.reader.read_elements(stored, picks)
        return values.to(t.dtype) if values.dtype.is_floating_point else values  # as loaded: the skeleton's dtype

    items = list(sm.model.state_dict().items())
    with ThreadPoolExecutor(16) as pool:
        samples = list(pool.map(sample, items))
    h = hashlib.sha256()
    for (name, _), values in zip(items, samples):
        h.update(name.encode())
        h.update(values.float().numpy().tobytes())
    return h.hexdigest()[:16]


def identity(sm: StreamedModel) -> dict:
    """What `WorkDir` records to tell models apart, equal to what the fully loaded model gives."""
    start = time.perf_counter()
    digest = streamed_weights_hash(sm)
    sm.identity_s = round(time.perf_counter() - start, 3)
    return {"source": sm.source, "config_hash": config_hash(sm.config), "weights_hash": digest}


# ---------------------------------------------------------------------------- the two sources

class Loaded:
    """A model in memory (on the CPU): a block goes to the device for its turn and back after it."""

    reads_embeddings = False  # the model's own embeddings serve the capture of block 0's inputs

    def __init__(self, model: nn.Module, arch):
        self.model, self.arch, self.config = model, arch, model.config
        self.dtype = next(model.parameters()).dtype
        self.embed_name = f"{arch.embed}.weight"

    def blocks(self) -> dict[str, nn.Module]:
        return decoder_blocks(self.model, self.arch)

    def fetch(self, prefix: str, device, copy_stream) -> None:
        return None  # already in memory

    def attach(self, prefix: str, block: nn.Module, tensors, device) -> None:
        block.to(device)

    def release(self, prefix: str, block: nn.Module) -> None:
        block.to("cpu")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.model.get_parameter(name).shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.model.get_parameter(name).detach()[start:stop].cpu()

    def outside_to(self, device) -> None:
        """Embeddings, rotary tables and the rest outside the blocks, for capturing block 0's inputs."""
        move_outside_blocks_(self.model, self.arch, device)

    def outside_done(self) -> None:
        move_outside_blocks_(self.model, self.arch, "cpu")


FETCH_BYTES = 256 << 20  # pinned CPU memory a block's weights pass through on the way to a GPU


class Shards:
    """A `StreamedModel`: blocks read from the checkpoint files, on the read thread, and freed after their turn."""

    reads_embeddings = True  # the sweep assembles them on the device from the shards (`set_embeddings`)

    def __init__(self, sm: StreamedModel):
        self.sm, self.model, self.arch, self.config, self.dtype = sm, sm.model, sm.arch, sm.config, sm.dtype
        self.reader = sm.reader
        self.embed_name = f"{self.arch.embed}.weight"
        self._embed_on_device = None

    def blocks(self) -> dict[str, nn.Module]:
        return decoder_blocks(self.model, self.arch)

    def fetch(self, prefix: str, device, copy_stream) -> dict[str, torch.Tensor]:
        """A block's weights on the device, in the model dtype (runs on the read thread). On a GPU they pass
        through pinned memory `FETCH_BYTES` at a time, which the next part reuses: the CPU holds a part of
        a block, not the block (a MoE block is 1.2 GB)."""
        cuda = torch.device(device).type == "cuda"
        block = self.model.get_submodule(prefix)
        dtypes = {f"{prefix}.{n}": t.dtype for n, t in block.state_dict(keep_vars=True).items()}  # persistent buffers too
        where = {name: stored_location(self.model, self.arch, self.reader, name, self.sm.rename) for name in dtypes}
        parts, size = [[]], 0
        for stored in dict.fromkeys(stored for stored, _ in where.values()):  # a fused tensor once, for all experts
            nbytes = self.reader.nbytes([stored])
            if parts[-1] and cuda and size + nbytes > FETCH_BYTES:
                parts.append([])
                size = 0
            parts[-1].append(stored)
            size += nbytes
        read = {}
        for part in parts:
            got = self.reader.read(part, pin_memory=cuda)
            if cuda:
                with torch.cuda.stream(copy_stream):
                    got = {n: t.to(device, non_blocking=True) for n, t in got.items()}
                copy_stream.synchronize()
            read.update(got)
        tensors = {}
        for name, (stored, expert) in where.items():
            t = read[stored]
            if expert is not None:  # one expert's part of a fused tensor
                layout, e, proj, bias = expert
                t = layout.take(t, e, proj, bias).contiguous()
            if self.sm.transform is not None:
                t = self.sm.transform(name, t)
            # Each in its dtype in the skeleton, as transformers loads it (DeepSeek's router stays fp32 in bf16).
            tensors[name] = t.to(dtypes[name]) if t.is_floating_point() else t
        return tensors

    def attach(self, prefix: str, block: nn.Module, tensors: dict[str, torch.Tensor], device) -> None:
        cuda = torch.device(device).type == "cuda"
        buffers = {f"{prefix}.{n}" for n, _ in block.named_buffers()}
        for name, t in tensors.items():
            if cuda:  # allocated on the copy stream: not to be reused before this stream's work is done
                t.record_stream(torch.cuda.current_stream(device))
            _set_tensor(self.model, name, t, parameter=name not in buffers)

    def release(self, prefix: str, block: nn.Module) -> None:
        block.to("meta")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.entries[stored_location(self.model, self.arch, self.reader, name, self.sm.rename)[0]].shape

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        stored = stored_location(self.model, self.arch, self.reader, name, self.sm.rename)[0]
        return self.reader.read_rows(stored, start, stop).to(self.dtype)

    def set_embeddings(self, embed: torch.Tensor) -> None:
        """The embeddings assembled on the device by the sweep (read once, a chunk of rows at a time)."""
        _set_tensor(self.model, self.embed_name, embed, parameter=True)

    def outside_to(self, device) -> None:
        inside = self.arch.blocks + "."
        for name, b in list(self.model.named_buffers()):
            if not name.startswith(inside):  # a block's own buffers come with its weights
                _set_tensor(self.model, name, b.to(device), parameter=False)

    def outside_done(self) -> None:
        _set_tensor(self.model, self.embed_name, torch.empty(self.shape(self.embed_name), dtype=self.dtype,
                                                              device="meta"), parameter=True)
