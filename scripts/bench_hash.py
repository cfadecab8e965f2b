"""Hashing throughput of the commitments, from the tensors' own buffers (no copies), side by side.

    python scripts/bench_hash.py [--mib 256 --repeats 5]

Times, on the same data: ``tensor_digest`` of one large float32 tensor (BLAKE3 derive_key over the
tensor's memory, threads for buffers >= 128 MiB), the same with one thread, ``state_digest`` of a
model-sized set of tensors (a 23.9 M-parameter Llama state dict), ``file_digest`` of a safetensors file
(memory-mapped), and hashlib's SHA-256 on the same bytes for scale. Prints GB/s (10^9 bytes per s).

Then the device BLAKE3 (``aftune_hf.device_blake3``, the same digests computed in torch operations)
on a ``--device-mib`` tensor: eager on the CPU (the reference the suite tests), compiled on the CPU
with ``--compile`` (~80 s of compiling first), and on CUDA eager and compiled when a GPU is present.
Each result is checked equal to ``tensor_digest`` before it is timed.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import blake3
import numpy as np
import safetensors.torch
import torch
import transformers
from benchkit import bench_model, emit, parser

from aftune_hf import digest as D


def rate(fn, nbytes: int, repeats: int) -> float:
    """Median GB/s of ``fn()`` over ``repeats`` runs (one warm-up first)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def device_rates(a) -> dict[str, float]:
    """GB/s of device_blake3.tensor_digests (eager / compiled, CPU / CUDA), each checked first."""
    from aftune_hf import device_blake3

    x = torch.randn(a.device_mib * (1 << 20) // 4)
    want = D.tensor_digest(x)
    variants = [("cpu", False)] + ([("cpu", True)] if a.compile else [])
    if torch.cuda.is_available():
        variants += [("cuda", False), ("cuda", True)]
    out = {}
    for device, compiled in variants:
        t = x.to(device)
        run = lambda: device_blake3.tensor_digests([t], compile=compiled)  # noqa: E731
        if run() != [want]:
            raise SystemExit(f"device BLAKE3 on {device} (compiled={compiled}) differs from tensor_digest")
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        out[f"device_blake3_{device}_{'compiled' if compiled else 'eager'}"] = rate(lambda: (run(), sync()), x.nbytes, a.repeats)
    return out


def main() -> int:
    ap = parser(__doc__, model=False)
    ap.add_argument("--mib", type=int, default=256, help="size of the large tensor")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device-mib", type=int, default=32, help="tensor size for the device BLAKE3")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd device BLAKE3 on the CPU")
    a = ap.parse_args()
    big = torch.randn(a.mib * (1 << 20) // 4)
    view = D.tensor_bytes(big)
    zero_copy = np.frombuffer(view, dtype=np.uint8).ctypes.data == big.data_ptr()  # hashes the tensor's own memory
    one_thread = lambda: blake3.blake3(view, derive_key_context=D.CONTEXTS["tensor"], max_threads=1).digest()  # noqa: E731
    results = {
        "tensor_digest": rate(lambda: D.tensor_digest(big), big.nbytes, a.repeats),
        "blake3_1_thread": rate(one_thread, big.nbytes, a.repeats),
        "sha256_hashlib": rate(lambda: hashlib.sha256(view).digest(), big.nbytes, a.repeats),
    }
    with tempfile.TemporaryDirectory(prefix="aftune-bench-hash-") as tmp:
        work = Path(tmp)
        base, _ = bench_model(work)
        state = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
        state_bytes = sum(t.numel() * t.element_size() for t in state.values())
        results["state_digest"] = rate(lambda: D.state_digest(state), state_bytes, a.repeats)
        safetensors.torch.save_file({"t": big}, work / "big.safetensors")
        results["file_digest"] = rate(lambda: D.file_digest(work / "big.safetensors"), big.nbytes, a.repeats)
    results.update(device_rates(a))
    print(f"large tensor {a.mib} MiB float32 (hashed in place: {zero_copy}), "
          f"model state {state_bytes / 1e6:.0f} MB in {len(state)} tensors; {torch.get_num_threads()} torch threads")
    for name, gbs in results.items():
        print(f"  {name:26} {gbs:7.3f} GB/s")
    emit(a.json, {"hash": {**results, "zero_copy": bool(zero_copy)}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
