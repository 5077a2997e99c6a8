"""safetensors shards without loading whole files: read chosen tensors, write planned shards as tensors arrive.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, a
JSON header of N bytes (`{name: {"dtype", "shape", "data_offsets": [begin, end]}}` plus
`__metadata__`, padded with spaces to a multiple of 8), then the tensors' bytes back to back.
Reading parses the header and `pread`s each tensor straight into its destination (pinned memory
when it goes to a GPU next), so no file is mapped and nothing is read twice. Writing lays every
shard out up front from the list of names, shapes and dtypes, so each tensor can be written at
its offset the moment it is computed; a shard never waits in memory.
"""

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lite.errors import LiteError

# safetensors' dtype names. `RANK` is the order of its Rust enum: a file lists tensors by
# descending rank, then by name, which keeps every tensor aligned to its element size.
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
          "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
          "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
          "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
RANK = {name: i for i, name in enumerate(DTYPES)}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes lie: absolute byte offsets into `file`."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str) -> dict[str, Entry]:
    """The tensors of one safetensors file, after checking that the file is whole (a truncated, empty or
    foreign file is a LiteError naming it)."""
    broken = f"{path} is not a complete safetensors file"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LiteError(f"{broken} ({size} bytes); re-download the model")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise LiteError(f"{broken} (its header claims {n} bytes, the file has {size}); re-download the model")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise LiteError(f"{broken} (its header is not JSON); re-download the model") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LiteError(f"{broken} (entry {name} is malformed); re-download the model") from None
        if dtype not in DTYPES:
            raise LiteError(f"{path}: tensor {name} has dtype {dtype}, which lite does not read")
        if 8 + n + end > size:
            raise LiteError(f"{path} is truncated: tensor {name} ends at byte {8 + n + end}, the file has {size}; "
                            "re-download the model")
        entries[name] = Entry(path, DTYPES[dtype], shape, 8 + n + begin, 8 + n + end)
    return entries


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a model folder (from its index when sharded); empty when it has none."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(folder, SINGLE)
    return [single] if os.path.isfile(single) else []


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor, `(nbytes,)`."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardReader:
    """Tensors of a safetensors checkpoint (one file or an index of shards), read by name."""

    def __init__(self, folder: str):
        files = checkpoint_files(folder)
        if not files:
            raise LiteError(f"{folder} has no {SINGLE} or {INDEX}")
        self.entries: dict[str, Entry] = {}
        for path in files:
            if not os.path.isfile(path):
                raise LiteError(f"{path} is listed in {INDEX} but missing; re-download the model")
            self.entries.update(read_header(path))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names_under(self, prefix: str) -> list[str]:
        return [name for name in self.entries if name.startswith(prefix)]

    def nbytes(self, names) -> int:
        return sum(self.entries[n].end - self.entries[n].begin for n in names)

    def read(self, names, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """`{name: CPU tensor}` in the checkpoint's dtypes, read straight into place with `pread`, in pieces
        of at most `READ_PIECE` bytes on `READ_THREADS` threads."""
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise LiteError(f"the checkpoint lacks {len(missing)} tensors the model needs (first: {missing[0]})")
        out, fds, pieces = {}, {}, []
        ordered = sorted(names, key=lambda n: (self.entries[n].file, self.entries[n].begin))
        try:
            for name in ordered:
                e = self.entries[name]
                if e.file not in fds:
                    fds[e.file] = os.open(e.file, os.O_RDONLY)
                t = out[name] = torch.empty(e.shape, dtype=e.dtype, pin_memory=pin_memory)
                view = _bytes_of(t) if e.end > e.begin else memoryview(b"")
                pieces += [(fds[e.file], view[start:start + READ_PIECE], e.begin + start, e.file)
                           for start in range(0, len(view), READ_PIECE)]
            if len(pieces) > 1:  # pieces in parallel: a page-cache copy runs at the speed of one core
                list(_read_pool().map(lambda piece: _pread_into(*piece), pieces))
            elif pieces:
                _pread_into(*pieces[0])
        finally:
            for fd in fds.values():
                os.close(fd)
        return {n: out[n] for n in names}

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, `(stop - start, *shape[1:])`, without reading the rest."""
        e = self.entries[name]
        t = torch.empty((stop - start, *e.shape[1:]), dtype=e.dtype)
        row_bytes = t[0].numel() * t.element_size() if len(t) else 0
        with open(e.file, "rb", buffering=0) as f:
            _pread_into(f.fileno(), _bytes_of(t), e.begin + start * row_bytes, e.file)
        return t

    def read_elements(self, name: str, flat_indices: list[int]) -> torch.Tensor:
        """Elements of a tensor at flat positions, `(len(flat_indices),)`, without reading the rest."""
        e = self.entries[name]
        size = torch.empty((), dtype=e.dtype).element_size()
        out = torch.empty(len(flat_indices), dtype=e.dtype)
        view = _bytes_of(out)
        with open(e.file, "rb") as f:
            for k, i in enumerate(flat_indices):
                f.seek(e.begin + i * size)
                view[k * size:(k + 1) * size] = f.read(size)
        return out


# `ShardReader.read` cuts tensors into pieces of at most READ_PIECE bytes, read by READ_THREADS threads.
READ_PIECE = 32 << 20
READ_THREADS = 8
_pool = None


def _read_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="lite-read")
    return _pool


def _pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise LiteError(f"{path} ends early: the file is truncated; re-download the model")
        done += n


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def shard_layout(layout: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int) -> list[list]:
    """Split `[(name, shape, dtype)]` in order into shards of at most `max_shard_size` bytes each
    (a single larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name, shape, dtype in layout:
        nbytes = _nbytes(shape, dtype)
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(shape), dtype))
        size += nbytes
    shards.append(current)
    return shards


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


class ShardWriter:
    """Writes the tensors of a fixed layout into `folder` as they arrive, in any order.

    The files are those `save_file` would write for the same shards, byte for byte:
    `model.safetensors`, or `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`.
    Call `close()` once every tensor is written.
    """

    def __init__(self, folder: str, layout: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int):
        shards = shard_layout(layout, max_shard_size)
        self.folder, self.where, self.fds, self.pending = folder, {}, [], set()
        self.weight_map, self.total, self.rows_written = {}, 0, {}
        for i, shard in enumerate(shards, 1):
            filename = SINGLE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            self.weight_map.update({name: filename for name, _, _ in shard})
            ordered = sorted(shard, key=lambda e: (-RANK[NAMES[e[2]]], e[0]))
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype in ordered:
                nbytes = _nbytes(shape, dtype)
                header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            fd = os.open(os.path.join(folder, filename), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            _pwrite_all(fd, memoryview(struct.pack("<Q", len(text)) + text), 0)
            os.ftruncate(fd, 8 + len(text) + offset)
            for name, shape, dtype in ordered:
                begin = 8 + len(text) + header[name]["data_offsets"][0]
                self.where[name] = (fd, begin, shape, dtype)
                self.pending.add(name)
            self.total += offset
        self.sharded = len(shards) > 1

    def write(self, name: str, t: torch.Tensor, row_start: int = 0) -> None:
        """Write one tensor (CPU) at its place, or, from `row_start` on, some of its rows."""
        if name not in self.where:
            raise AssertionError(f"{name} is not in the planned layout")
        fd, begin, shape, dtype = self.where[name]
        whole = row_start == 0 and tuple(t.shape) == shape
        assert t.dtype == dtype and (whole or (tuple(t.shape[1:]) == shape[1:] and row_start + len(t) <= shape[0])), \
            f"{name}: planned {shape} {dtype}, got {tuple(t.shape)} {t.dtype} from row {row_start}"
        if t.numel():
            row_bytes = t[0].numel() * t.element_size() if t.dim() else 0
            _pwrite_all(fd, _bytes_of(t.contiguous()), begin + row_start * row_bytes)
        rows = self.rows_written.get(name, 0) + (len(t) if t.dim() else 1)
        self.rows_written[name] = rows
        if whole or rows >= shape[0]:
            self.pending.discard(name)

    def close(self) -> None:
        assert not self.pending, f"{len(self.pending)} planned tensors were never written, e.g. {sorted(self.pending)[:3]}"
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.sharded:
            with open(os.path.join(self.folder, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, f, indent=2)
