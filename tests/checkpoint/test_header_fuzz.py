"""Malformed safetensors headers: a small valid file mutated in many ways (each field of each entry replaced by
hostile values, fields removed, the length prefix and metadata broken, random bytes flipped, truncations). Reading any
of them either works (the mutation left a sound file) or raises UserError: never TypeError, ValueError, RuntimeError,
struct.error or any other traceback."""
from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

from dreambooth import cli
from dreambooth.checkpoint.tensorio import SafetensorsSource, open_checkpoint
from dreambooth.errors import UserError

HOSTILE_VALUES = [None, True, False, -1, 0, 1.5, float("inf"), "x", "", [], {}, [0], [0, 1, 2], [5, 2], [-4, 4],
                  [0.0, 4.0], ["0", "4"], [True, 4], [0, 10**30], 10**30, [[0, 4]], {"0": 4}, [None, None],
                  [0, 2**64], [2**63, 2**63 + 4], "F32", [1, 2, 3, 4, 5, 6, 7, 8, 9]]
HOSTILE_DTYPES = ["F8_E4M3", "F8_E5M2", "f32", "float32", "Q4_0", "U16", "U64", "C64", "BF16 ", "\u0000", "F" * 10_000]


def valid_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16),
               "c": torch.tensor(7, dtype=torch.int64), "d": torch.zeros(0, 3), "e": torch.tensor([True, False])},
              str(path), metadata={"format": "pt"})
    return path.read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def mutations(data: bytes):
    """(label, bytes) of every mutated file."""
    header, body = split(data)
    for key in [k for k in header if k != "__metadata__"]:
        for field in ("dtype", "shape", "data_offsets"):
            for value in HOSTILE_VALUES:
                h = json.loads(json.dumps(header))
                h[key][field] = value
                yield f"{key}.{field}={str(value)[:20]}", join(h, body)
            h = json.loads(json.dumps(header))
            del h[key][field]
            yield f"{key} without {field}", join(h, body)
        for dtype in HOSTILE_DTYPES:
            h = json.loads(json.dumps(header))
            h[key]["dtype"] = dtype
            yield f"{key}.dtype={dtype[:10]}", join(h, body)
        for other in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"):
            h = json.loads(json.dumps(header))
            h[key]["dtype"] = other  # a size that may disagree with the byte range
            yield f"{key}.dtype={other}", join(h, body)
        begin, end = header[key]["data_offsets"]
        for offsets in ([end, begin], [begin, end + 1], [begin + 1, end], [begin, len(body) + 8], [0, len(body)]):
            h = json.loads(json.dumps(header))
            h[key]["data_offsets"] = offsets
            yield f"{key}.data_offsets={offsets}", join(h, body)
        for shape in ([2, -3], [3, 2], [6], [1, 1, 1, 1, 1, 6], [2**40, 2**40], [0], []):
            h = json.loads(json.dumps(header))
            h[key]["shape"] = shape
            yield f"{key}.shape={shape}", join(h, body)
        for value in HOSTILE_VALUES:
            h = json.loads(json.dumps(header))
            h[key] = value
            yield f"{key}={str(value)[:20]}", join(h, body)
    for value in HOSTILE_VALUES + [{"a": 1}, {"a": None}, {"a": ["x"]}]:
        h = json.loads(json.dumps(header))
        h["__metadata__"] = value
        yield f"__metadata__={str(value)[:20]}", join(h, body)
    for value in ([], "x", 1, None, [header]):
        yield f"header={str(value)[:20]}", join(value, body)
    raw = json.dumps(header).encode()
    for prefix in (0, 1, 7, len(raw) - 1, len(raw) + 1, len(raw) + len(body) + 1, 2**63, 2**64 - 1, 100_000_001):
        yield f"header length {prefix}", struct.pack("<Q", prefix) + raw + body
    for blob in (b"[" * 100_000 + b"]" * 100_000, b"{" + b'"a":{' * 50_000 + b"}" * 50_001, b"\xff\xfe{}",
                 b'{"a": NaN}', b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b"]}}",
                 b"", b"   ", b"{}", b'{"a": 1, "a": {}}'):
        yield f"header bytes {blob[:12]!r}", join(blob, body)
    for cut in sorted({0, 1, 4, 7, 8, 9, 20, len(raw), len(raw) + 8, len(data) - 1, len(data) // 2}):
        yield f"cut at {cut}", data[:cut]
    rng = random.Random(1234)
    for i in range(400):  # random byte changes inside the header
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(8, 8 + len(raw))] = rng.randrange(256)
        yield f"random flip {i}", bytes(mutated)
    for i in range(50):  # random changes of the length prefix
        mutated = bytearray(data)
        mutated[rng.randrange(0, 8)] = rng.randrange(256)
        yield f"random prefix {i}", bytes(mutated)


def read_everything(path):
    source = SafetensorsSource([path])
    for key in source.keys():
        source.shape(key), source.dtype(key)
        tensor = source.get(key)
        assert tuple(tensor.shape) == source.shape(key) and tensor.dtype == source.dtype(key)
    source.metadata().get("format")
    open_checkpoint(path).keys()


def test_every_mutated_header_reads_or_is_a_user_error(tmp_path):
    data = valid_file(tmp_path)
    read_everything(tmp_path / "good.safetensors")
    path = tmp_path / "mutated.safetensors"
    outcomes = {"read": 0, "UserError": 0}
    unexpected = []
    for label, blob in mutations(data):
        path.write_bytes(blob)
        try:
            read_everything(path)
            outcomes["read"] += 1
        except UserError as e:
            assert "\n" not in str(e) and len(str(e)) < 400, (label, str(e)[:500])
            outcomes["UserError"] += 1
        except Exception as e:  # noqa: BLE001 - exactly what the test is about
            unexpected.append(f"{label}: {type(e).__name__}: {str(e)[:120]}")
    assert not unexpected, "\n".join(unexpected[:20])
    assert outcomes["UserError"] >= 500, outcomes  # the mutations mostly break the file: they really were tried
    print(outcomes)


@pytest.mark.parametrize("mutate", ["offsets not a pair", "reversed offsets", "dtype size disagrees", "shape not a list",
                                    "unknown dtype", "header beyond the file"])
def test_the_cli_says_one_line_and_exits_non_zero(tmp_path, capsys, mutate):
    header, body = split(valid_file(tmp_path))
    if mutate == "offsets not a pair":
        header["a"]["data_offsets"] = [0]
    elif mutate == "reversed offsets":
        header["a"]["data_offsets"] = header["a"]["data_offsets"][::-1]
    elif mutate == "dtype size disagrees":
        header["a"]["dtype"] = "F16"
    elif mutate == "shape not a list":
        header["a"]["shape"] = 6
    elif mutate == "unknown dtype":
        header["a"]["dtype"] = "F8_E4M3"
    blob = join(header, body)
    if mutate == "header beyond the file":
        blob = struct.pack("<Q", len(blob)) + blob[8:]
    source = tmp_path / "bad.safetensors"
    source.write_bytes(blob)
    code = cli.main(["--root", str(tmp_path / "root"), "create", "m", "--source", str(source)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and str(source) in err
