"""BLAKE3 in torch operations (aftune_hf.device_blake3) against the ``blake3`` package.

The device hash must give the standard digest bit for bit, or every per-step state digest
recorded on a GPU would FAIL an honest trace. Run here on CPU (the same torch operations as on
CUDA); the compiled variant is checked at first use against the blake3 package and falls back to
the eager operations when it disagrees (tested with a broken compiler below).
"""

from __future__ import annotations

import os
import random
import warnings

import blake3
import pytest
import torch

from aftune_hf import device_blake3 as B
from aftune_hf import digest as D

C, K = B.CHUNK, B.BLOCK
# every size class: empty, inside one block, block edges, inside one chunk, exact chunk
# multiples (powers of two and not), a chunk plus a tail, tails of every block position
EDGES = [0, 1, 3, K - 1, K, K + 1, C - 1, C, C + 1, 2 * C, 3 * C, 4 * C, 5 * C, 8 * C, 7 * C + K, 9 * C - 1,
         16 * C, 17 * C + 1, 31 * C + 5 * K + 3]  # fmt: skip


def _random_sizes(rnd: random.Random, n: int) -> list[int]:
    sizes = []
    for _ in range(n):
        kind = rnd.randrange(4)
        if kind == 0:
            sizes.append(rnd.randrange(0, C))  # under one chunk
        elif kind == 1:
            sizes.append(C * rnd.randrange(1, 40))  # exact chunk multiple
        elif kind == 2:
            sizes.append(C * rnd.randrange(1, 40) + rnd.randrange(1, C))  # odd tail
        else:
            sizes.append(rnd.randrange(0, 70 * C))  # anything up to 70 chunks (7 tree levels)
    return sizes


def _messages(sizes: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in sizes]


def _ref(m: torch.Tensor, **kw) -> bytes:
    return blake3.blake3(m.numpy().tobytes(), **kw).digest()


@pytest.mark.parametrize("seed", range(4))
def test_a_thousand_random_inputs_equal_the_blake3_package(seed):
    """4 x 260 = 1 040 messages (the edge sizes plus 241 random ones per batch), hashed in one batch."""
    sizes = EDGES + _random_sizes(random.Random(seed), 241)
    msgs = _messages(sizes, seed)
    got = B.hash_messages(msgs, compile=False)
    bad = [n for n, m, g in zip(sizes, msgs, got) if g != _ref(m)]
    assert not bad, f"digests differ for sizes {bad[:10]}"


def test_keyed_and_derive_key_modes_equal_the_blake3_package():
    msgs = _messages(EDGES, 7)
    key = bytes(range(32))
    assert B.hash_messages(msgs, key=key, flags=B.KEYED_HASH) == [_ref(m, key=key) for m in msgs]
    ctx = D.CONTEXTS["tensor"]
    derived = B.hash_messages(msgs, key=B.derive_key(ctx), flags=B.DERIVE_KEY_MATERIAL)
    assert derived == [_ref(m, derive_key_context=ctx) for m in msgs]


def test_a_message_in_parts_is_their_concatenation():
    a, b, c = _messages([5, 2 * C + 3, 0], 3)
    assert B.hash_messages([(a, b, c)]) == [_ref(torch.cat([a, b, c]))]


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    big = torch.randn(97, 41, generator=g)
    return [
        big, big.T, big[::3, 1:], torch.randn(5000, generator=g).to(torch.bfloat16), torch.tensor(7, dtype=torch.int64),
        torch.zeros(0, 3, dtype=torch.bool), torch.tensor([1.0, -0.0, float("nan")]), torch.arange(255, dtype=torch.uint8),
        torch.randn(3, 256, generator=g).to(torch.float16), torch.randn(2, 2, dtype=torch.float64, generator=g),
    ]  # fmt: skip


def test_tensor_digests_equal_digest_tensor_digest():
    """Every dtype class, non-contiguous views, a scalar, an empty tensor, NaN and -0.0."""
    ts = _tensors()
    assert B.tensor_digests(ts) == [D.tensor_digest(t) for t in ts]


def test_state_digest_equals_digest_state_digest():
    state = {f"layer.{i}.weight": t for i, t in enumerate(_tensors())}
    assert B.state_digest(state) == D.state_digest(state)
    flipped = dict(state)
    flipped["layer.0.weight"] = state["layer.0.weight"].clone()
    flipped["layer.0.weight"].view(torch.int32)[3, 7] ^= 1  # one bit
    assert B.state_digest(flipped) != B.state_digest(state)
    assert B.state_digest(flipped) == D.state_digest(flipped)


def test_messages_on_two_devices_or_of_another_dtype_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        B.hash_messages([torch.zeros(3, dtype=torch.int32)])


@pytest.fixture
def fresh_compressor():
    B._compressor.cache_clear()
    yield
    B._compressor.cache_clear()


def test_a_compiler_that_gets_blake3_wrong_is_not_used(monkeypatch, fresh_compressor):
    def miscompile(fn, **kw):
        return lambda cv, m, *rest: fn(cv, m ^ 1, *rest)  # a wrong kernel: flips message bits

    monkeypatch.setattr(torch, "compile", miscompile)
    with pytest.warns(UserWarning, match="gives other digests"):
        fn = B._compressor("cpu", True)
    assert fn is B._compress
    msgs = _messages(EDGES, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.hash_messages(msgs, compile=True) == [_ref(m) for m in msgs]


def test_a_compiler_that_fails_is_not_used(monkeypatch, fresh_compressor):
    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("no backend")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="failed .*no backend"):
        B._compressor("cpu", True)
    msgs = _messages(EDGES, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fallen back already: no second warning, right digests
        assert B.hash_messages(msgs, compile=True) == [_ref(m) for m in msgs]


@pytest.mark.skipif(not os.environ.get("AFTUNE_TEST_COMPILE"), reason="torch.compile takes ~80 s here; AFTUNE_TEST_COMPILE=1")
def test_compiled_on_cpu_equals_the_blake3_package(fresh_compressor):
    sizes = EDGES + _random_sizes(random.Random(9), 100)
    msgs = _messages(sizes, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert B.hash_messages(msgs, compile=True) == [_ref(m) for m in msgs]


def test_a_compiled_function_that_fails_later_falls_back_for_good(monkeypatch, fresh_compressor):
    """A recompilation for a new shape that fails must not stop recording: same digest, eager."""
    calls, fail = [], []

    def flaky(fn, **kw):
        def call(*a):
            calls.append(1)
            if fail:
                raise RuntimeError("recompile failed")
            return fn(*a)

        return call

    monkeypatch.setattr(torch, "compile", flaky)
    B._compressor("cpu", True)  # the self-test passes
    fail.append(True)
    before = len(calls)
    msgs = _messages(EDGES, 5)
    with pytest.warns(UserWarning, match="recompile failed"):
        got = B.hash_messages(msgs, compile=True)
    assert got == [_ref(m) for m in msgs]
    assert len(calls) == before + 1  # once failed, never called again
