"""Packed format: exact pack/unpack round trip, layout details, validation of tampering."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparamx.format import (
    VALUES_PAD,
    PackedWeight,
    PackedWeightError,
    bytes_for,
    pack,
    padded_shape,
)

DIMS = st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, 64, 100, 577])


def random_sparse(n, k, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    return w


@settings(max_examples=60, deadline=None)
@given(
    n=DIMS,
    k=DIMS,
    sparsity=st.sampled_from([0.0, 0.03, 0.5, 0.9, 1.0]),
    storage=st.sampled_from(["auto", "bitmap-bf16", "dense-bf16"]),
    seed=st.integers(0, 99),
)
def test_pack_unpack_round_trip_is_exact(n, k, sparsity, storage, seed):
    w = random_sparse(n, k, sparsity, seed)
    p = pack(w, storage=storage)
    assert torch.equal(p.unpack(), w)
    assert p.unpack().dtype == torch.bfloat16
    assert p.nnz == int((w != 0).sum())


def test_unit_layout_is_vnni_order():
    n, k = 32, 64
    w = torch.arange(n * k, dtype=torch.float32).view(n, k).to(torch.bfloat16) + 1
    p = pack(w, storage="dense-bf16")
    units = p.values.view(2, 32, 32)  # [G, P, 32]
    g, pair, c, j = 1, 5, 7, 1
    assert units[g, pair, 2 * c + j] == w[16 * g + c, 2 * pair + j]


def test_bitmap_bits_and_values_order():
    w = torch.zeros(16, 32, dtype=torch.bfloat16)
    w[3, 0] = 1.0  # unit (0, 0), bit 2*3+0 = 6
    w[0, 1] = 2.0  # unit (0, 0), bit 1
    w[15, 3] = 3.0  # unit (0, 1), bit 31
    p = pack(w, storage="bitmap-bf16")
    assert int(p.bitmap[0, 0]) == (1 << 6) | (1 << 1)
    assert int(p.bitmap[0, 1]) & 0xFFFFFFFF == 1 << 31
    assert p.values[:3].tolist() == [2.0, 1.0, 3.0]
    assert p.offsets.tolist() == [0, 3]
    assert p.values.numel() == 3 + VALUES_PAD


def test_mask_argument_selects_entries():
    w = torch.ones(20, 40)
    mask = torch.rand(20, 40) < 0.3
    p = pack(w, mask)
    assert torch.equal(p.unpack().bool(), mask)


def test_auto_storage_keeps_low_sparsity_dense():
    w = random_sparse(64, 64, 0.0)
    assert pack(w).storage == "dense-bf16"
    assert pack(random_sparse(64, 64, 0.5)).storage == "bitmap-bf16"
    n, k = 4096, 4096
    assert bytes_for(n, k, n * k // 2, "bitmap-bf16") < bytes_for(n, k, 0, "dense-bf16")


def test_padded_shape():
    assert padded_shape(1, 1) == (16, 32)
    assert padded_shape(17, 33) == (32, 64)
    assert padded_shape(4096, 14336) == (4096, 14336)


@pytest.mark.parametrize("bad", ["offsets", "bitmap", "values", "pad_bit", "dtype"])
def test_tampered_packed_weight_is_rejected(bad):
    p = pack(random_sparse(20, 40, 0.5))
    t = {k: v.clone() for k, v in p.tensors().items()}
    if bad == "offsets":
        t["offsets"][1] += 1
    elif bad == "bitmap":
        t["bitmap"][0, 0] ^= 1 << 3
    elif bad == "values":
        t["values"] = t["values"][:-1]
    elif bad == "pad_bit":  # a kept bit in padded column 45 would never be unpacked
        t["bitmap"][-1, -1] |= 1
        t["offsets"][-1] += 1
        t["values"] = torch.cat([t["values"], torch.zeros(1, dtype=torch.bfloat16)])
    elif bad == "dtype":
        t["offsets"] = t["offsets"].int()
    with pytest.raises(PackedWeightError):
        PackedWeight((20, 40), "bitmap-bf16", t["values"], t["bitmap"], t["offsets"])


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.ones(3))
    with pytest.raises(ValueError, match="floating-point"):
        pack(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask shape"):
        pack(torch.ones(3, 3), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="storage"):
        pack(torch.ones(3, 3), storage="csr")
    with pytest.raises(ValueError, match="non-empty"):
        pack(torch.ones(0, 3))
