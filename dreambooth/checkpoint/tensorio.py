"""Reading checkpoints lazily and writing them one tensor at a time, so memory stays near one copy of the model.

A `TensorSource` gives names, shapes and dtypes without loading anything, and one tensor on request.
`write_safetensors` writes the header first and then each tensor as it is produced, so no second full copy of the
model is ever held (safetensors' own save_file serialises everything into memory first).
"""
from __future__ import annotations

import json
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import UserError

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
NAMED_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
ELEMENT_SIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in NAMED_DTYPES.items()}


class TensorSource:
    """Named tensors: keys(), shape(k), dtype(k), get(k)."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def close(self) -> None:
        pass


class DictSource(TensorSource):
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def __contains__(self, key):
        return key in self.tensors

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def dtype(self, key):
        return self.tensors[key].dtype

    def get(self, key):
        return self.tensors[key]


class SafetensorsSource(TensorSource):
    """One or more .safetensors files (a sharded folder is several), read tensor by tensor with plain reads.

    Not memory-mapped on purpose: every mapped page a conversion touches would count in the process's resident
    memory until the end, so importing a 7 GB file would hold 7 GB. A read copies one tensor and frees it.
    """

    def __init__(self, paths: Iterable[Path]):
        self.where: dict[str, tuple[Path, int, dict]] = {}
        self._metadata: dict = {}
        for path in paths:
            header, data_start = read_header(Path(path))
            self._metadata = self._metadata or header.pop("__metadata__", None) or {}
            header.pop("__metadata__", None)
            for key, info in header.items():
                self.where[key] = (Path(path), data_start, info)

    def keys(self):
        return list(self.where)

    def __contains__(self, key):
        return key in self.where

    def shape(self, key):
        return tuple(self.where[key][2]["shape"])

    def dtype(self, key):
        return NAMED_DTYPES[self.where[key][2]["dtype"]]

    def get(self, key):
        path, data_start, info = self.where[key]
        begin, end = info["data_offsets"]
        try:
            with open(path, "rb") as f:
                f.seek(data_start + begin)
                raw = bytearray(f.read(end - begin))
        except OSError as e:
            raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from e
        if len(raw) != end - begin:
            raise UserError(f"{path}: truncated inside tensor {key}")
        dtype = NAMED_DTYPES[info["dtype"]]
        if not raw:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(info["shape"])

    def metadata(self) -> dict:
        return self._metadata


class RenamedSource(TensorSource):
    """Another source under new names: {new name: old name}."""

    def __init__(self, source: TensorSource, names: dict[str, str]):
        self.source, self.names = source, names

    def keys(self):
        return list(self.names)

    def __contains__(self, key):
        return key in self.names

    def shape(self, key):
        return self.source.shape(self.names[key])

    def dtype(self, key):
        return self.source.dtype(self.names[key])

    def get(self, key):
        return self.source.get(self.names[key])


MAX_HEADER = 100_000_000  # bytes; a full SDXL checkpoint's header is about 200 kB
MAX_DIMS, MAX_DIM = 16, 2**48  # far beyond any real tensor, within what torch can describe


def _is_count(value, limit: int = 2**62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


def _check_entry(info) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(info, dict):
        return "not a tensor description"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in NAMED_DTYPES:
        return f"dtype {str(dtype)[:20]!r} is not one of {', '.join(NAMED_DTYPES)}"
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d, MAX_DIM) for d in shape):
        return "shape is not a list of sizes"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        return "data_offsets is not a pair of byte offsets"
    begin, end = offsets
    if begin > end:
        return f"data_offsets {begin} > {end}"
    count = 1
    for d in shape:
        count *= d
    if count * ELEMENT_SIZE[dtype] != end - begin:
        return f"{end - begin} bytes do not hold a {dtype} tensor of shape {str(shape)[:60]}"
    return None


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data section) of a safetensors file; UserError if it is not a sound one.

    Every entry is checked (dtype, shape, offsets inside the file and matching the shape), so reading a tensor later
    cannot fail on a malformed header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a checkpoint (file too short)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER or header_len + 8 > size:
                raise UserError(f"{path}: not a checkpoint or truncated (bad safetensors header)")
            raw = f.read(header_len)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not a checkpoint (the safetensors header is not JSON)") from e
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a checkpoint (bad safetensors header)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: not a checkpoint (the safetensors metadata is not a table of texts)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        problem = _check_entry(info)
        if problem:
            raise UserError(f"{path}: damaged safetensors header (tensor {key[:100]!r}: {problem})")
        end = max(end, info["data_offsets"][1])
    if 8 + header_len + end > size:
        raise UserError(f"{path}: truncated ({size} bytes, the header needs {8 + header_len + end})")
    return header, 8 + header_len


def open_checkpoint(path: Path) -> TensorSource:
    """A single-file checkpoint (.safetensors, or a .ckpt/.pt read with weights_only=True) as a TensorSource."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from e
    if head[:2] == b"PK" or path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        return _open_torch(path)
    return SafetensorsSource([path])


def _open_torch(path: Path) -> TensorSource:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(2) == b"PK":
                raise UserError(f"{path}: truncated or damaged (a zip archive without its directory)")
        raise UserError(f"{path}: not a checkpoint (not a torch zip archive; legacy pickles are not read)")
    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt zip, a truncated entry, or a pickle with non-tensor objects
        raise UserError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a checkpoint (holds a {type(data).__name__}, not a state dict)")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: not a checkpoint (no tensors)")
    return DictSource(tensors)


# ---- writing ----

class Entry:
    """One tensor of an output file: its name, shape, dtype and how to produce it."""

    __slots__ = ("key", "shape", "dtype", "make")

    def __init__(self, key: str, shape: tuple, dtype: torch.dtype, make: Callable[[], torch.Tensor]):
        self.key, self.shape, self.dtype, self.make = key, tuple(shape), dtype, make

    def tensor(self) -> torch.Tensor:
        t = self.make().detach().to(device="cpu", dtype=self.dtype).contiguous()  # the trainer's may be on a GPU
        if tuple(t.shape) != self.shape:
            raise RuntimeError(f"{self.key}: produced shape {tuple(t.shape)}, planned {self.shape}")
        return t


def _nbytes(entry: Entry) -> int:
    n = 1
    for d in entry.shape:
        n *= d
    return n * torch.empty((), dtype=entry.dtype).element_size()


def _tensor_bytes(t: torch.Tensor) -> bytes | memoryview:
    if t.numel() == 0:
        return b""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, entries: list[Entry], metadata: dict | None = None) -> None:
    """Write entries to path (the caller makes it atomic), one tensor in memory at a time."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        size = _nbytes(e)
        header[e.key] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            f.write(_tensor_bytes(e.tensor()))


# Records newer torch writes that the webui's restricted loader does not allow (its allowlist predates them).
NEW_TORCH_RECORDS = (".format_version", ".storage_alignment")
ALIGNMENT = 64  # torch aligns each tensor's bytes to 64 so that the file can be memory-mapped


def write_ckpt(path: Path, entries: list[Entry]) -> None:
    """A .ckpt the webui's restricted unpickler accepts: {"state_dict": OrderedDict of plain tensors}.

    torch.save writes the archive; it is then copied record by record without the records that the webui's
    zip-name allowlist rejects, keeping each tensor 64-byte aligned.
    """
    path = Path(path)
    raw = path.with_name(path.name + ".torch")
    try:
        state = OrderedDict((e.key, e.tensor()) for e in entries)
        with open(raw, "wb") as f:  # a file object: the archive folder is then named "archive"
            writer = _RecordingWriter(f)
            try:
                torch.save({"state_dict": state}, writer)
            except RuntimeError:
                if writer.error is not None:  # torch reports a failed write only as a bad position
                    raise writer.error from None
                raise
        del state
        with zipfile.ZipFile(raw) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                if info.filename.split("/", 1)[-1] in NEW_TORCH_RECORDS:
                    continue
                _write_aligned(zout, info.filename, zin.read(info))
    finally:
        raw.unlink(missing_ok=True)


class _RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write (disk full), which torch would only report
    as a C++ assertion about the archive's position."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def _write_aligned(zout: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = zout.fp.tell() + 30 + len(name.encode("utf-8")) + 4  # local header + name + the padding field's header
    padding = -start % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
    zout.writestr(info, data)
