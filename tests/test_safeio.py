"""Hostile files: safetensors headers (V1-V7, V10, V12), JSON, paths (V13), atomic writes."""

from __future__ import annotations

import os
import json
import struct

import pytest
import safetensors.torch
import torch

from aftune_hf.errors import PathSafetyError, RecorderError, TraceFormatError
from aftune_hf.safeio import (
    atomic_write_bytes,
    loads_json_strict,
    parse_safetensors,
    validate_relpath,
)

GOOD = safetensors.torch.save({"a": torch.ones(2, 3), "b": torch.arange(4)}, metadata={"format": "pt"})


def _blob(header: dict | str | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def test_round_trip_of_a_valid_file():
    t = parse_safetensors(GOOD, path="g")
    assert torch.equal(t["a"], torch.ones(2, 3)) and torch.equal(t["b"], torch.arange(4))


@pytest.mark.parametrize(
    "blob,code",
    [
        (b"", "header_too_small"),
        (b"\x01\x02\x03", "header_too_small"),
        (_blob({}, declared=10 * 2**30), "header_too_large"),  # V1: 10 GB declared
        (_blob({}, declared=100_000_001), "header_too_large"),
        (_blob("{}", declared=999), "header_length_invalid"),  # V2
        (_blob(b"\xff\xfe{}"), "header_not_utf8"),  # V3
        (_blob(" []"), "header_start"),
        (_blob("{not json"), "header_not_json"),
        (_blob('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4), "duplicate_key"),  # V4
        (_blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "offsets_invalid"),  # V5 overlap
        (_blob({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "offsets_invalid"),  # V5 trailing bytes
        (_blob({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "offsets_invalid"),  # past EOF
        (_blob({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "shape_dtype_mismatch"),  # V6
        (_blob({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "dtype_unknown"),
        (_blob({"a\u0000b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "tensor_name_invalid"),  # V7
        (_blob({"__metadata__": {"format": 5}}), "metadata_invalid"),
        (safetensors.torch.save({"a": torch.ones(1)}, metadata={"format": "pt", "x": "1"}), "metadata_unexpected"),  # V10
        (b"PK\x03\x04" + b"\0" * 60, "header_length_invalid"),  # V12: a zip/pickle named .safetensors
    ],
)
def test_malformed_safetensors_rejected(blob, code):
    with pytest.raises(TraceFormatError) as e:
        parse_safetensors(blob, path="x.safetensors")
    assert e.value.code == code


def test_strict_json():
    assert loads_json_strict(b'{"a": 1}', path="p") == {"a": 1}
    for data, code in [(b'{"a":1,"a":2}', "duplicate_key"), (b'{"a": NaN}', "invalid_json"),
                       (b"\xff", "json_not_utf8"), (b"{", "invalid_json"), (b"[" * 100000, "invalid_json")]:  # fmt: skip
        with pytest.raises(TraceFormatError) as e:
            loads_json_strict(data, path="p")
        assert e.value.code == code


@pytest.mark.parametrize(
    "path",
    ["../../etc/passwd", "/abs", "C:\\x", "C:/x", "a\\..\\b", "a//b", "./a", "a/./b", "a/../b", "",
     "a\x00b", "%2e%2e/x", "a\u2215b", "caf\u0065\u0301", "a b", "x/" * 10 + "y"],
)  # fmt: skip
def test_unsafe_paths_rejected(path):
    with pytest.raises(PathSafetyError):
        validate_relpath(path)


def test_safe_paths_accepted():
    for p in ["chain.jsonl", "anchors/step-00000004/params.safetensors", ".gitattributes"]:
        assert validate_relpath(p) == p


def test_atomic_write_leaves_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")
    import os

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(RecorderError, match="No space left"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # temp file cleaned


def test_append_durable_completes_short_writes(tmp_path, monkeypatch):
    """A full disk makes os.write write less than asked; the old append_durable ignored the count
    and left a 43-byte chain line with no error."""
    import aftune_hf.safeio as S

    real = os.write
    monkeypatch.setattr(S.os, "write", lambda fd, data: real(fd, bytes(data[:7])))  # at most 7 bytes a call
    f = tmp_path / "chain.jsonl"
    S.append_durable(f, b"first line\n")
    S.append_durable(f, b'{"i":2,"record":{"kind":"step"}}\n')
    assert f.read_bytes() == b'first line\n{"i":2,"record":{"kind":"step"}}\n'


def test_append_durable_is_all_or_nothing_on_enospc(tmp_path, monkeypatch):
    import errno

    import aftune_hf.safeio as S
    from aftune_hf.errors import RecorderError

    f = tmp_path / "chain.jsonl"
    S.append_durable(f, b"committed\n")
    real, calls = os.write, []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data[:5]))  # part of the line fits
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S.os, "write", full_disk)
    with pytest.raises(RecorderError, match="write_failed"):
        S.append_durable(f, b"a line that does not fit\n")
    assert f.read_bytes() == b"committed\n"  # nothing of the failed append is left
    monkeypatch.setattr(S.os, "write", lambda fd, data: 0)  # a write that makes no progress
    with pytest.raises(RecorderError, match="short write"):
        S.append_durable(f, b"x\n")
    assert f.read_bytes() == b"committed\n"
