"""Commitments: golden vectors, RFC 6962 / CT vectors, tree structure, properties."""

from __future__ import annotations

import struct
import threading

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aftune_hf import digest as D
from aftune_hf import records as R
from aftune_hf.report import detection_probability

# Frozen bytes -> frozen hex. If one of these changes, every existing trace stops verifying:
# change the protocol version and the context strings instead.
GOLDEN = {
    "tensor_f32": "1507031253830cb6c5dd486a665e306827d6564c374026c4976c991b5f633266",
    "tensor_f32_pos0": "31848277269ed3b8a5e689caa802d072dcec825c343f8f3e067241be41d38523",
    "tensor_bf16": "b63fdcd545e7e090ddb776727e6df5da68a0a4f85aaf83c877659648103dea93",
    "tensor_i64_scalar": "d6fa52e38c7447a2fac46b684aefe0b91cdc4a3dd024164960bbbf005fefaaf2",
    "tensor_bool_empty": "ae627182c866c52881b8854003827f3e2b893801db35ab0a532a8f05a416b66e",
    "state": "bcb1dbef908df33d42d0a6f69d458a78e38b05f14f1a0a54bf30304d613285ae",
    "batch": "4c59de64ffe03c780e7e40338813d99efbcf87983bbda81840e63d9f956c711a",
    "state_empty": "d1600e80b20828c22734f2093d0f5657262fbfc08bc560959d1560f29459441a",
    "records_root3": "ab5f33d49d74722aefcba1d0664c021adc3bae5e578fe8fc945ca174d33f101d",
    "chain_start": "59349d0dadbf7b5d5d722931bd6127e5e31736d63136ec2396464669c2e45e07",
    "chain_next": "357ee0f7de4b083ce34c82e1da5424df889e590f152bddfcb819d8043d9bc40b",
    "record_leaf": "7007f232cb597543ce3be90f8d265ae6a605b9d74e9431d877c25ca0fe8577e8",
    "step_data": "0e700c0f4cad4d9c374671eb10a1580e736f74cdc6b5e61d630135fe4bf5f30e",
    "json": "63834f396374876e847ba007b845a8639bc799e8c343fc42f7f256af1dcbe5c0",
    "trace_root": "232e0b6f8836c0aa8241ecb30cbf0188d1cf376e83d826b4108299a8c1009fe9",
    "seed": "2e476f83e4c5114e1e37b71c96f4179c5f77f8af5de9ccf18da0e9f54c41926f",
    "windows": [0, 5, 21, 25, 36, 40, 46, 49],
    "model": "2b71a20b63559da866c5e418aabcf1074f7318b06278d650f0d8bd2914c1de8f",
    "anchor": "0b21311d54f799a3786212bc6b4a0a7ffeb777de45ed7eba4766418774a530c7",
}


def _computed() -> dict:
    g = {}
    g["tensor_f32"] = D.tensor_digest(torch.tensor([1.0, -0.0, float("nan")], dtype=torch.float32))
    g["tensor_f32_pos0"] = D.tensor_digest(torch.tensor([1.0, 0.0, float("nan")], dtype=torch.float32))
    g["tensor_bf16"] = D.tensor_digest(torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))
    g["tensor_i64_scalar"] = D.tensor_digest(torch.tensor(7, dtype=torch.int64))
    g["tensor_bool_empty"] = D.tensor_digest(torch.zeros(0, 3, dtype=torch.bool))
    g["state"] = D.state_digest({"b": torch.ones(2), "a": torch.zeros(1, 2)})
    g["batch"] = D.batch_digest({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[-100, 2, 3]])})
    g["state_empty"] = D.STATE_TREE.root([])
    g["records_root3"] = D.RECORD_TREE.root([b"a", b"b", b"c"])
    g["chain_start"] = D.chain_start(bytes(32), "run-1")
    g["chain_next"] = D.chain_next(g["chain_start"], 1, b"\x01" * 32)
    rec = R.step_record(step=3, batches=[[b"\x02" * 32, b"\x03" * 32]], num_items=17, loss=2.5, lr=1e-3,
                        grad_norm=0.75, state=b"\x04" * 32, checkpoint=True, anchor=None)  # fmt: skip
    g["record_leaf"] = D.record_leaf(rec)
    g["step_data"] = D.step_data_digest([[b"\x02" * 32, b"\x03" * 32], [b"\x05" * 32]])
    g["json"] = D.json_digest({"b": [1, "x", None, True], "a": D.encode_float(0.1)})
    g["trace_root"] = D.trace_root({"num_steps": 3, "chain_head": "00" * 32})
    g["seed"] = D.challenge_seed(b"\x11" * 32, b"client nonce", 1)
    g["windows"] = D.sample_windows(g["seed"], 50, 8)
    g["model"] = D.model_digest(bytes(32), {"hidden_size": 64})
    g["anchor"] = D.anchor_digest({"params": bytes(32), "optimizer": b"\x01" * 32, "rng": b"\x02" * 32, "meta": b"\x03" * 32})
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in g.items()}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vectors(name):
    assert _computed()[name] == GOLDEN[name]


def test_tensor_digest_matches_the_written_spec():
    """docs/FORMAT.md: H_tensor(lp(dtype) || u64(ndim) || u64(dims) || raw LE bytes), derive_key mode."""
    t = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float32)
    h = blake3.blake3(derive_key_context="aftune_hf 2026-11-25 v1 tensor")
    h.update(struct.pack(">Q", 3) + b"F32" + struct.pack(">QQQ", 2, 1, 3))
    h.update(struct.pack("<3f", 1.0, 2.0, 3.0))
    assert D.tensor_digest(t) == h.digest()


def test_contexts_are_distinct_per_role():
    assert len(set(D.CONTEXTS.values())) == len(D.CONTEXTS)
    assert D.hash_bytes("state leaf", b"x") != D.hash_bytes("batch leaf", b"x")


def test_tensor_digest_sensitive_to_dtype_shape_and_bits():
    a = torch.zeros(4, dtype=torch.float32)
    assert D.tensor_digest(a) != D.tensor_digest(a.reshape(2, 2))
    assert D.tensor_digest(a) != D.tensor_digest(a.view(torch.int32))
    assert D.tensor_digest(a) != D.tensor_digest(torch.tensor([0.0, 0.0, 0.0, -0.0]))
    assert D.tensor_digest(a[::2]) == D.tensor_digest(torch.zeros(2))  # non-contiguous views hash their values


# --- RFC 6962 / Certificate Transparency test vectors ---------------------------------------

CT_LEAVES = [bytes.fromhex(h) for h in
             ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]]  # fmt: skip
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# (leaf index, tree size, audit path) from the CT/transparency-dev inclusion proof vectors
CT_PROOFS = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip
T = D.RFC6962_SHA256


@pytest.mark.parametrize("n", range(9))
def test_rfc6962_roots(n):
    assert T.root(CT_LEAVES[:n]).hex() == CT_ROOTS[n]


@pytest.mark.parametrize("index,size,path", CT_PROOFS)
def test_rfc6962_inclusion_proofs(index, size, path):
    hashes = [T.leaf(d) for d in CT_LEAVES[:size]]
    assert [p.hex() for p in T.inclusion_proof(hashes, index)] == path
    root = bytes.fromhex(CT_ROOTS[size])
    proof = [bytes.fromhex(p) for p in path]
    assert T.verify_inclusion(hashes[index], index, size, proof, root)
    # wrong index, wrong size, wrong leaf, truncated or extended path: all rejected
    assert not T.verify_inclusion(hashes[index], index ^ 1, size, proof, root)
    assert not T.verify_inclusion(hashes[index], index, size * 2, proof, root)
    assert not T.verify_inclusion(T.leaf(b"other"), index, size, proof, root)
    assert not T.verify_inclusion(hashes[index], index, size, proof[:-1], root)
    assert not T.verify_inclusion(hashes[index], index, size, [*proof, proof[0]], root)


def test_every_proof_verifies_in_every_size_with_blake3():
    tree = D.RECORD_TREE
    leaves = [tree.leaf(bytes([i, i * 7 % 256])) for i in range(37)]
    for n in range(1, len(leaves) + 1):
        root = tree.root_from_hashes(leaves[:n])
        for i in range(n):
            proof = tree.inclusion_proof(leaves[:n], i)
            assert tree.verify_inclusion(leaves[i], i, n, proof, root)
            assert not tree.verify_inclusion(leaves[(i + 1) % n], i, n, proof, root) or n == 1


# --- structure ------------------------------------------------------------------------------


def test_split_is_largest_power_of_two_below_n():
    assert [D._split(n) for n in (2, 3, 4, 5, 8, 9, 1000)] == [1, 2, 2, 4, 4, 8, 512]


def test_duplicated_last_leaf_trick_gives_a_different_root():
    """Bitcoin CVE-2012-2459: [1..6] and [1..6,5,6] must not share a root."""
    data = [bytes([i]) for i in range(1, 7)]
    for tree in (T, D.RECORD_TREE):
        assert tree.root(data) != tree.root([*data, data[4], data[5]])
        assert tree.root(data[:5]) != tree.root([*data[:5], data[4]])


def test_leaf_node_confusion_rejected():
    """An interior node's children, concatenated, presented as one leaf, must not give the same root."""
    data = [b"a", b"b", b"c", b"d"]
    for tree in (T, D.RECORD_TREE):
        hashes = [tree.leaf(d) for d in data]
        left = tree.node(hashes[0], hashes[1])
        right = tree.node(hashes[2], hashes[3])
        assert tree.root([hashes[0] + hashes[1], hashes[2] + hashes[3]]) != tree.root(data)
        # an interior node offered as leaf 0 does not verify at the committed tree size
        root = tree.root(data)
        assert not tree.verify_inclusion(left, 0, len(data), [right], root)
        assert tree.root_from_hashes([left, right]) == root  # (the honest shape, for contrast)
        assert tree.root([left, right]) != root


def test_tree_size_is_committed_by_shape():
    assert D.RECORD_TREE.root([b"x"]) != D.RECORD_TREE.root([b"x", b"x"])
    assert D.RECORD_TREE.root([]) != D.RECORD_TREE.root([b""])


# --- properties ------------------------------------------------------------------------------

names = st.text(alphabet="abcdefghij._", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(names, st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=5), min_size=1, max_size=6), st.randoms())
def test_state_digest_is_order_invariant(values, rnd):
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}
    keys = list(tensors)
    rnd.shuffle(keys)
    assert D.state_digest(tensors) == D.state_digest({k: tensors[k] for k in keys})


def test_state_digest_hashed_in_parallel_is_the_same_digest(monkeypatch):
    """Many-core machines hash a large state's tensors side by side; the digest must not change
    (each tensor under its own name, whatever order the threads finish in)."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.w": torch.randn(64, 64 + i, generator=g) for i in range(12)}
    sequential = D.state_digest(tensors)
    calls: list[str] = []
    real = D.tensor_digest
    monkeypatch.setattr(D, "tensor_digest", lambda t: calls.append(threading.current_thread().name) or real(t))
    monkeypatch.setattr(D, "_PARALLEL_STATE", 1)
    monkeypatch.setattr(D.os, "cpu_count", lambda: 8)
    assert D.state_digest(tensors) == sequential
    assert all(name.startswith("aftune-hash") for name in calls) and len(calls) == 12


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=4, max_size=64).filter(lambda b: len(b) % 4 == 0), st.data())
def test_single_bit_flip_changes_tensor_and_state_digest(raw, data):
    t = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    u = torch.frombuffer(flipped, dtype=torch.float32).clone()
    assert D.tensor_digest(t) != D.tensor_digest(u)
    assert D.state_digest({"w": t}) != D.state_digest({"w": u})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=16), min_size=1, max_size=20), st.data())
def test_any_leaf_change_changes_the_root(leaves, data):
    i = data.draw(st.integers(0, len(leaves) - 1))
    changed = list(leaves)
    changed[i] = leaves[i] + b"\x00"
    assert D.RECORD_TREE.root(leaves) != D.RECORD_TREE.root(changed)


# --- chain and challenge ----------------------------------------------------------------------


def test_chain_binds_order_and_index():
    c0 = D.chain_start(bytes(32), "r")
    a, b = b"\x01" * 32, b"\x02" * 32
    assert D.chain_next(D.chain_next(c0, 1, a), 2, b) != D.chain_next(D.chain_next(c0, 1, b), 2, a)
    assert D.chain_next(c0, 1, a) != D.chain_next(c0, 2, a)
    assert D.chain_start(bytes(32), "r") != D.chain_start(bytes(32), "s")


def test_window_sampler_deterministic_includes_ends_without_replacement():
    seed = D.challenge_seed(b"\x05" * 32, b"n")
    for n, k in [(1, 3), (2, 5), (10, 4), (100, 17), (7, 7)]:
        w = D.sample_windows(seed, n, k)
        assert w == D.sample_windows(seed, n, k)
        assert len(w) == len(set(w)) == min(max(k, min(2, n)), n)
        assert w[0] == 0 and w[-1] == n - 1
    assert D.sample_windows(D.challenge_seed(b"\x05" * 32, b"m"), 100, 10) != D.sample_windows(seed, 100, 10)


def test_window_sampler_is_roughly_uniform():
    counts = [0] * 20
    for i in range(400):
        for w in D.sample_windows(D.challenge_seed(bytes(32), i.to_bytes(4, "big")), 20, 5):
            counts[w] += 1
    middle = counts[1:-1]
    assert counts[0] == counts[-1] == 400
    assert min(middle) > 40 and max(middle) < 130  # expectation 400*3/18 = 66.7


def test_detection_probability():
    assert detection_probability(100, 10, 0) == 0.0
    assert detection_probability(100, 100, 1) == 1.0
    assert detection_probability(10, 1, 1) == pytest.approx(0.1)
    assert detection_probability(100, 30, 10) > 1 - 0.9**30  # without replacement beats with


def test_canonical_json_rejects_floats_and_sorts_keys():
    assert D.canonical_json({"b": 1, "a": [True, None]}) == b'{"a":[true,null],"b":1}'
    with pytest.raises(TypeError):
        D.canonical_json({"x": 0.5})
    with pytest.raises(ValueError):
        D.canonical_json(2**60)


def test_step_data_digest_matches_the_written_spec():
    """docs/FORMAT.md: H_{step data}(u64(ranks) || per rank: u64(micro-batches) || their batch digests)."""
    a, b, c = b"\x02" * 32, b"\x03" * 32, b"\x05" * 32
    h = blake3.blake3(derive_key_context="aftune_hf 2026-11-25 v1 step data")
    h.update(struct.pack(">Q", 2) + struct.pack(">Q", 2) + a + b + struct.pack(">Q", 1) + c)
    assert D.step_data_digest([[a, b], [c]]) == h.digest()
    assert D.step_data_digest([[a], [b, c]]) != D.step_data_digest([[a, b], [c]])  # moving a batch to another rank
