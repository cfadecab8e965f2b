"""Safe bytes on disk: atomic writes, hostile-file opening and strict safetensors parsing.

Nothing here knows the trace layout (that is :mod:`aftune_hf.trace`); these are the
primitives it stands on.

* :func:`atomic_write_bytes` / :func:`atomic_save_safetensors`: temp file in the same
  directory, fsync, rename, fsync the directory.
* :func:`read_regular_file`: opens with ``O_NOFOLLOW``, refuses anything but a regular
  file, bounds the size before reading.
* :func:`parse_safetensors`: our own validation of the header (size, UTF-8, leading
  ``{``, duplicate keys, dtype allowlist, offsets contiguous and covering the buffer,
  names, metadata) before the official ``safetensors`` library decodes the tensors.
* :func:`loads_json_strict`: JSON with duplicate keys and non-finite numbers rejected.

Example:
    >>> import torch, safetensors.torch
    >>> blob = safetensors.torch.save({"w": torch.ones(2)}, metadata={"format": "pt"})
    >>> sorted(parse_safetensors(blob, path="x.safetensors"))
    ['w']
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import unicodedata
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import PathSafetyError, RecorderError, ResourceLimitError, TraceFormatError

SAFETENSORS_MAX_HEADER = 100_000_000  # the reference implementation's own cap
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-/]{1,512}$")


# --- writing --------------------------------------------------------------------------------


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")


_DROP_FROM_CACHE = 1 << 20  # files this large are written once and not read back while training


def _commit_tmp(tmp: Path, final: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise") and os.fstat(fd).st_size >= _DROP_FROM_CACHE:
            # Durable now, so its pages are clean: release them. Otherwise every checkpoint grows the
            # page cache and, under a memory limit, later writes pay for reclaim -- measured here as
            # 230 instead of 28 ms of CPU per 100 MB written (docs/DESIGN-DECISIONS.md §19).
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def append_durable(path: str | os.PathLike[str], data: bytes) -> None:
    """Append all of ``data`` to ``path`` (created if absent) and fsync it -- or nothing.

    ``os.write`` may write less than asked (a full disk does); the rest is written in further
    calls, and if any call fails the file is cut back to its old length, so a reader never sees
    part of an append.

    Raises:
        RecorderError: on any OS error (disk full, I/O error); the file is as it was.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise RecorderError("write_failed", f"{e.strerror or e}", path=Path(path).name) from e
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(28, "no space left on device (short write)")
                view = view[n:]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:
                pass  # the reader drops a torn tail on resume; the error below stops the recorder
            raise RecorderError("write_failed", f"{e.strerror or e}", path=Path(path).name) from e
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp, fsync, rename, fsync dir).

    Raises:
        RecorderError: on any OS error (disk full, I/O error); the temp file is removed
            and the previous content of ``path``, if any, is untouched.
    """
    commit_staged(*stage_bytes(path, data))


@contextlib.contextmanager
def _removed_on_error(tmp: Path, final: Path) -> Iterator[None]:
    """Delete ``tmp`` if the block fails; an OSError (disk full, I/O error) becomes RecorderError."""
    try:
        yield
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RecorderError("write_failed", f"{e.strerror or e}", path=str(final)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def stage_bytes(path: str | os.PathLike[str], data: bytes) -> tuple[Path, Path]:
    """Write ``data`` to a temp file next to ``path``; returns ``(tmp, final)`` for :func:`commit_staged`."""
    final = Path(path)
    tmp = _tmp_path(final)
    with _removed_on_error(tmp, final):
        with open(tmp, "xb") as f:
            f.write(data)
    return tmp, final


def stage_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: Mapping[str, str]
) -> tuple[Path, Path]:
    """Write tensors to a temp file next to ``path`` (not yet durable or visible).

    Returns ``(tmp, final)`` for :func:`commit_staged`. Once this returns, the tensors have
    been read and may change.
    """
    from safetensors.torch import save_file

    final = Path(path)
    tmp = _tmp_path(final)
    with _removed_on_error(tmp, final):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, dict(metadata))
    return tmp, final


def commit_staged(tmp: Path, final: Path) -> None:
    """fsync a staged file, rename it into place, fsync the directory."""
    with _removed_on_error(tmp, final):
        _commit_tmp(tmp, final)


def atomic_save_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: Mapping[str, str]
) -> None:
    """Save tensors with ``safetensors`` atomically (same guarantees as :func:`atomic_write_bytes`)."""
    commit_staged(*stage_safetensors(path, tensors, metadata))


# --- reading hostile files -----------------------------------------------------------------------


def validate_relpath(rel: str, *, max_depth: int = 8) -> str:
    """Accept only NFC, relative POSIX paths of ``[A-Za-z0-9._-]`` segments; return it unchanged.

    Raises:
        PathSafetyError: for absolute paths, ``..``/``.``/empty segments, backslashes,
            drive letters, control or non-ASCII characters, or excessive depth.
    """
    if not isinstance(rel, str) or not rel:
        raise PathSafetyError("invalid_path", "empty or not a string", path=repr(rel))
    if unicodedata.normalize("NFC", rel) != rel:
        raise PathSafetyError("invalid_path", "not NFC-normalised", path=repr(rel))
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise PathSafetyError("absolute_path", "absolute path", path=repr(rel))
    segments = rel.split("/")
    for seg in segments:
        if seg in ("", ".", ".."):
            raise PathSafetyError("path_traversal", f"segment {seg!r} not allowed", path=repr(rel))
        if not re.fullmatch(r"[A-Za-z0-9._\-]{1,200}", seg):
            raise PathSafetyError("invalid_path", "characters outside [A-Za-z0-9._-]", path=repr(rel))
    if len(segments) > max_depth:
        raise PathSafetyError("too_deep", f"{len(segments)} levels > {max_depth}", path=rel)
    return rel


def read_regular_file(root: Path, rel: str, *, max_bytes: int) -> bytes:
    """Read ``root/rel`` refusing symlinks (at any level), special files and oversized files."""
    validate_relpath(rel)
    current = root
    for seg in rel.split("/")[:-1]:
        current = current / seg
        if current.is_symlink():
            raise PathSafetyError("symlink", "directory is a symlink", path=rel)
    try:
        fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        if (root / rel).is_symlink():
            raise PathSafetyError("symlink", "file is a symlink", path=rel) from e
        raise
    try:
        st = os.fstat(fd)
        import stat

        if not stat.S_ISREG(st.st_mode):
            raise PathSafetyError("special_file", "not a regular file", path=rel)
        if st.st_size > max_bytes:
            raise ResourceLimitError("file_too_large", f"{st.st_size} bytes > {max_bytes}", path=rel)
        chunks = []
        remaining = st.st_size
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _reject_constant(token: str) -> float:
    raise ValueError(f"non-finite number {token}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise KeyError(k)
        out[k] = v
    return out


def loads_json_strict(data: bytes, *, path: str) -> Any:
    """Parse UTF-8 JSON refusing duplicate keys, NaN/Infinity and invalid UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TraceFormatError("json_not_utf8", str(e), path=path) from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except KeyError as e:
        raise TraceFormatError("duplicate_key", f"key {e.args[0]!r} appears twice", path=path) from None
    except (ValueError, RecursionError) as e:
        raise TraceFormatError("invalid_json", str(e)[:200], path=path) from None


# --- safetensors --------------------------------------------------------------------------------


def parse_safetensors_header(
    blob: bytes, *, path: str, max_header: int = SAFETENSORS_MAX_HEADER
) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate a safetensors buffer and return ``(tensor_infos, metadata)`` without decoding data.

    Raises:
        TraceFormatError: with codes ``header_too_small``, ``header_too_large``,
            ``header_length_invalid``, ``header_not_utf8``, ``header_start``,
            ``header_not_json``, ``duplicate_key``, ``dtype_unknown``,
            ``shape_dtype_mismatch``, ``offsets_invalid``, ``tensor_name_invalid``,
            ``metadata_invalid``.
    """
    if len(blob) < 8:
        raise TraceFormatError("header_too_small", f"{len(blob)} bytes", path=path)
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(max_header, SAFETENSORS_MAX_HEADER):
        raise TraceFormatError("header_too_large", f"declared {n} bytes", path=path)
    if 8 + n > len(blob):
        raise TraceFormatError("header_length_invalid", f"declared {n}, file {len(blob)}", path=path)
    raw = blob[8 : 8 + n]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TraceFormatError("header_not_utf8", "header is not UTF-8", path=path) from None
    if not text.startswith("{"):
        raise TraceFormatError("header_start", "header does not start with '{'", path=path)
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except KeyError as e:
        raise TraceFormatError("duplicate_key", f"key {e.args[0]!r} twice", path=path) from None
    except (ValueError, RecursionError) as e:
        raise TraceFormatError("header_not_json", str(e)[:200], path=path) from None
    if not isinstance(header, dict):
        raise TraceFormatError("header_not_json", "header is not an object", path=path)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TraceFormatError("metadata_invalid", "metadata must map str to str", path=path)
    data_len = len(blob) - 8 - n
    spans = []
    for name, info in header.items():
        if not _NAME_RE.fullmatch(name):
            raise TraceFormatError("tensor_name_invalid", repr(name)[:80], path=path)
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise TraceFormatError("header_not_json", f"bad entry for {name}", path=path)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPE_SIZES:
            raise TraceFormatError("dtype_unknown", f"{name}: {dtype!r}", path=path)
        if not isinstance(shape, list) or not all(
            type(d) is int and 0 <= d < 2**48 for d in shape
        ):
            raise TraceFormatError("shape_dtype_mismatch", f"{name}: bad shape", path=path)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and 0 <= o <= data_len for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise TraceFormatError("offsets_invalid", f"{name}: {offsets!r}", path=path)
        numel = 1
        for d in shape:
            numel *= d
        if numel * _DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
            raise TraceFormatError("shape_dtype_mismatch", f"{name}: size != offsets", path=path)
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise TraceFormatError("offsets_invalid", f"{name}: hole or overlap", path=path)
        cursor = end
    if cursor != data_len:
        raise TraceFormatError("offsets_invalid", "buffer not fully covered", path=path)
    return header, metadata


def parse_safetensors(
    blob: bytes,
    *,
    path: str,
    allowed_metadata: Mapping[str, str] | None = None,
    max_header: int = SAFETENSORS_MAX_HEADER,
) -> dict[str, Any]:
    """Strictly validate then decode a safetensors buffer into CPU tensors.

    ``allowed_metadata`` (default ``{"format": "pt"}``) is the exact metadata expected.
    """
    _, metadata = parse_safetensors_header(blob, path=path, max_header=max_header)
    expected = {"format": "pt"} if allowed_metadata is None else dict(allowed_metadata)
    if metadata != expected:
        raise TraceFormatError("metadata_unexpected", f"{metadata!r}"[:200], path=path)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return dict(load(blob))
    except (SafetensorError, ValueError) as e:  # pragma: no cover - pre-validation catches these
        raise TraceFormatError("safetensors_invalid", str(e)[:200], path=path) from None
