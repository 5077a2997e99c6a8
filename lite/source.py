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
from lite.model import LoadedModel, config_hash, decoder_blocks, load_tokenizer, move_outside_blocks_, read_config, \
    resolve_dtype, shrunk_config
from lite.moe import unfuse_experts_
from lite.shards import ShardReader


@dataclass
class StreamedModel(LoadedModel):
    """A model whose weights stay in its shards: `model` holds meta parameters and real buffers."""

    reader: ShardReader = None
    dtype: torch.dtype = None
    opened_at: float = 0.0  # perf_counter() when opening began, so that timings include it
    identity_s: float = 0.0  # seconds spent on `identity`


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name)
    if parameter:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


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
    if any(name.startswith(inside) for name, _ in model.named_buffers()):
        return None
    # Non-persistent buffers (rotary inv_freq, Gemma's embed_scale) come from the config, not the
    # checkpoint: build the model without blocks and with a tiny vocabulary, and take them from it.
    helper = dict(AutoModelForCausalLM.from_config(shrunk_config(config, vocab_size=8), dtype=torch_dtype,
                                                   trust_remote_code=trust_remote_code).named_buffers())
    # The checkpoint's names are the model's, or the record maps them (`checkpoint_names`); a checkpoint
    # that transformers maps otherwise (other prefixes, fused experts on disk) is loaded with transformers.
    tied = f"{arch.lm_head}.weight" if getattr(config, "tie_word_embeddings", False) else None
    if any(to_checkpoint(arch, name) not in reader and name != tied for name, _ in model.named_parameters()):
        return None
    for name, _ in list(model.named_buffers()):
        stored = to_checkpoint(arch, name)
        if name in helper:
            _set_tensor(model, name, helper[name].clone(), parameter=False)
        elif stored in reader:
            _set_tensor(model, name, reader.read([stored])[stored], parameter=False)
        else:
            return None
    return StreamedModel(model, tokenizer, source, source, reader, torch_dtype, opened_at)


def _source_name(sm: StreamedModel, name: str) -> str:
    """The checkpoint tensor a state-dict entry is loaded from (a tied lm_head reads the embeddings)."""
    if getattr(sm.config, "tie_word_embeddings", False) and name == f"{sm.arch.lm_head}.weight":
        name = f"{sm.arch.embed}.weight"
    return to_checkpoint(sm.arch, name)


def streamed_weights_hash(sm: StreamedModel) -> str:
    """`lite.model.weights_hash` of the loaded model, from 16 elements per tensor read off the shards
    (many small reads: in parallel, which a cold disk serves far faster than one after another)."""

    def sample(item):
        name, t = item
        numel = t.numel()
        picks = list(range(0, numel, max(1, numel // 16)))[:16]
        values = sm.reader.read_elements(_source_name(sm, name), picks)
        return values.to(sm.dtype) if values.dtype.is_floating_point else values

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
        names = [f"{prefix}.{n}" for n, _ in block.named_parameters()]
        parts, size = [[]], 0
        for name in names:
            nbytes = self.reader.nbytes([to_checkpoint(self.arch, name)])
            if parts[-1] and cuda and size + nbytes > FETCH_BYTES:
                parts.append([])
                size = 0
            parts[-1].append(name)
            size += nbytes
        tensors = {}
        for part in parts:
            stored = {to_checkpoint(self.arch, name): name for name in part}
            read = {stored[n]: t for n, t in self.reader.read(list(stored), pin_memory=cuda).items()}
            if cuda:
                with torch.cuda.stream(copy_stream):
                    read = {n: t.to(device, non_blocking=True) for n, t in read.items()}
                copy_stream.synchronize()
            tensors.update(read)
        return {n: t.to(self.dtype) if t.is_floating_point() else t for n, t in tensors.items()}

    def attach(self, prefix: str, block: nn.Module, tensors: dict[str, torch.Tensor], device) -> None:
        cuda = torch.device(device).type == "cuda"
        for name, t in tensors.items():
            if cuda:  # allocated on the copy stream: not to be reused before this stream's work is done
                t.record_stream(torch.cuda.current_stream(device))
            _set_tensor(self.model, name, t, parameter=True)

    def release(self, prefix: str, block: nn.Module) -> None:
        block.to("meta")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.entries[to_checkpoint(self.arch, name)].shape

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.reader.read_rows(to_checkpoint(self.arch, name), start, stop).to(self.dtype)

    def set_embeddings(self, embed: torch.Tensor) -> None:
        """The embeddings assembled on the device by the sweep (read once, a chunk of rows at a time)."""
        _set_tensor(self.model, self.embed_name, embed, parameter=True)

    def outside_to(self, device) -> None:
        for name, b in list(self.model.named_buffers()):
            _set_tensor(self.model, name, b.to(device), parameter=False)

    def outside_done(self) -> None:
        _set_tensor(self.model, self.embed_name, torch.empty(self.shape(self.embed_name), dtype=self.dtype,
                                                              device="meta"), parameter=True)
