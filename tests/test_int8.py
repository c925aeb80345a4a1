"""The int8 storages (bitmap-int8, dense-int8): quantization, format validation, every
kernel against the dequantizing reference, layers, torch.compile and artifacts."""

import json
import shutil

import pytest
import torch
from conftest import masked_linear, tiny_config, tiny_tokenizer, zero_random_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import BF16_REL, FP32_REL
from test_kernels import RUNNABLE, random_weight
from torch import nn

import sparamx
from sparamx.artifact import MANIFEST, ArtifactError, read_manifest
from sparamx.format import (
    GROUP,
    QBLOCK,
    PackedWeight,
    PackedWeightError,
    bytes_for,
    k_blocks,
    pack,
    quantize,
    reference_linear,
)
from sparamx.integrity import manifest_digest
from sparamx.layers import DenseLinear, SparseLinear
from sparamx.ops import packed_linear

INT8 = ("bitmap-int8", "dense-int8")


AMX = ("amx", "amx_emulated")  # prefill (M > 4) through bf16(q * scale) weights


def weights_in_bf16(kernel: str | None, m: int) -> bool:
    """Whether ``kernel`` (None: the one chosen for ``m`` rows) multiplies bf16(q * scale)."""
    if kernel is None:
        kernel = sparamx.kernel_info()["paths"]["int8_decode" if m <= 4 else "int8_prefill"]
    return kernel in AMX and m > 4


def assert_matches_dequantized(y, x, packed, bias=None, kernel=None, weights_bf16=None):
    """``y`` must equal bf16(x) @ (q * scale).T (+ bias) in fp32, within the tolerances of
    reference.py (the kernels sum q * x per block, then scale: another rounding order).
    A kernel that multiplies bf16(q * scale) (the AMX prefill; ``kernel`` None: the one
    chosen for these rows) has each weight off by a relative 2^-9 at most."""
    if weights_bf16 is None:
        weights_bf16 = weights_in_bf16(kernel, x.reshape(-1, x.shape[-1]).shape[0])
    xb = x.to(torch.bfloat16).float()
    w = packed.unpack(torch.float32)
    ref = xb @ w.T + (0 if bias is None else bias.float())
    tol = (2.0**-8 if weights_bf16 else FP32_REL) * (xb.abs() @ w.abs().T) + 1e-6
    if y.dtype == torch.bfloat16:
        tol = tol + BF16_REL * ref.abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    assert not (err > tol).any(), f"{int((err > tol).sum())} outputs off, worst {float(err.max())}"


# ---- quantization and format ----


@settings(max_examples=30, deadline=None)
@given(
    n=st.sampled_from([1, 15, 16, 17, 40]),
    k=st.sampled_from([1, 31, 100, 127, 128, 129, 300]),
    sparsity=st.sampled_from([0.0, 0.5, 0.9]),
    storage=st.sampled_from(INT8),
    seed=st.integers(0, 999),
)
def test_quantization_error_bound_and_layout(n, k, sparsity, storage, seed):
    w = random_weight(n, k, sparsity, seed).float() * 0.1
    p = pack(w, storage=storage)
    kb = k_blocks(k)
    assert p.scales.shape == (-(-n // GROUP), kb, GROUP) and p.scales.dtype == torch.float32
    assert p.values.dtype == torch.int8
    # scale per (row, block) = max|w| / 127
    wp = torch.zeros(n, kb * QBLOCK)
    wp[:, :k] = w
    expect = wp.view(n, kb, QBLOCK).abs().amax(-1) / 127
    got = p.scales.permute(0, 2, 1).reshape(-1, kb)[:n]
    assert torch.equal(got, expect)
    deq = p.unpack(torch.float32)
    scale_of = got.repeat_interleave(QBLOCK, dim=1)[:, :k]
    assert ((w - deq).abs() <= scale_of / 2 * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(deq[w == 0], torch.zeros_like(deq[w == 0]))  # zeros stay zero
    assert p.unpack().dtype == torch.bfloat16
    assert torch.equal(p.unpack(), deq.to(torch.bfloat16))
    assert p.nbytes == bytes_for(n, k, p.nnz, storage)


def test_all_zero_blocks_get_scale_zero_without_nan():
    w = torch.randn(20, 300)
    w[:, 128:256] = 0  # a whole block of every row
    w[3] = 0  # a whole row
    for storage in INT8:
        p = pack(w, storage=storage)
        assert torch.isfinite(p.scales).all()
        assert (p.scales[:, 1] == 0).all() and (p.scales[0, :, 3] == 0).all()
        deq = p.unpack(torch.float32)
        assert torch.isfinite(deq).all() and (deq[:, 128:256] == 0).all()
    zero = pack(torch.zeros(16, 64), storage="bitmap-int8")
    assert zero.nnz == 0 and (zero.scales == 0).all()


def test_quantize_rounds_to_nearest_symmetric():
    w = torch.tensor([[127.0, -127.0, 63.5, 0.49, -0.5, 1.5, 0.0, 100.2]])
    q, s = quantize(w)
    assert float(s[0, 0]) == 1.0
    assert q[0, :8].tolist() == [127, -127, 64, 0, 0, 2, 0, 100]  # ties to even
    assert int(q.min()) >= -127


def test_bytes_per_weight():
    n, k = 4096, 4096
    per_weight = {
        (st_, s): bytes_for(n, k, int(n * k * (1 - s)), st_) / (n * k)
        for st_ in ("bitmap-int8", "bitmap-bf16")
        for s in (0.5, 0.7)
    }
    assert per_weight["bitmap-int8", 0.5] == pytest.approx(0.125 + 0.5 + 4 / 128, abs=1e-3)
    assert per_weight["bitmap-int8", 0.7] == pytest.approx(0.125 + 0.3 + 4 / 128, abs=1e-3)
    assert per_weight["bitmap-bf16", 0.5] / per_weight["bitmap-int8", 0.5] > 1.7


def test_auto_int8_chooses_the_layout_by_sparsity():
    w = torch.randn(40, 200)
    assert pack(w, storage="auto-int8").storage == "dense-int8"  # 0% sparse
    w[:, ::10] = 0  # 10% >= min_sparsity
    assert pack(w, storage="auto-int8").storage == "bitmap-int8"
    assert pack(w, storage="auto-int8", min_sparsity=0.2).storage == "dense-int8"
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    p = pack(w, mask, storage="auto-int8")
    assert p.storage == "bitmap-int8" and torch.equal(p.kept(), mask & (w != 0))
    want = pack(w * mask, storage="bitmap-int8")  # what naming the storage gives
    for key, t in want.tensors().items():
        assert torch.equal(p.tensors()[key], t), key
    assert pack(w.bfloat16(), storage="auto").storage == "bitmap-bf16"
    with pytest.raises(ValueError, match="'int4' is not one of auto, auto-int8, bitmap-bf16"):
        pack(w, storage="int4")


def test_weight_scales_and_kept():
    w = torch.randn(20, 300)
    w[w.abs() < 0.5] = 0
    for storage in INT8:
        p = pack(w, storage=storage)
        step = p.weight_scales()
        assert step.shape == w.shape
        assert ((p.unpack(torch.float32) - w).abs() <= step * (0.5 + 1e-5)).all()
        assert torch.equal(p.kept(), p.unpack(torch.float32) != 0 if storage[0] == "d" else w != 0)
    with pytest.raises(ValueError, match="no scales"):
        pack(w, storage="bitmap-bf16").weight_scales()


@pytest.mark.parametrize("storage", INT8)
def test_round_trip_through_tensors_and_requantize(storage):
    w = random_weight(33, 200, 0.5, 1).float()
    p = pack(w, storage=storage)
    t = p.tensors()
    assert set(t) == (
        {"values", "scales"} | ({"bitmap", "offsets"} if "bitmap" in storage else set())
    )
    again = PackedWeight(
        p.shape, storage, t["values"], t.get("bitmap"), t.get("offsets"), t["scales"]
    )
    assert torch.equal(again.unpack(torch.float32), p.unpack(torch.float32))
    # Re-quantizing the dequantized weight gives the same q (each block's max is 127 q).
    p2 = pack(p.unpack(torch.float32), storage="dense-int8")
    assert torch.equal(p2.unpack(torch.float32), p.unpack(torch.float32))


def test_mask_argument_and_bitmap_keeps_zero_rounded_values():
    w = torch.randn(16, 128)
    w[0, 0] = 1e-6  # rounds to q = 0 but is a kept (unpruned) weight
    mask = torch.rand(16, 128) < 0.5
    mask[0, 0] = True
    p = pack(w, mask, storage="bitmap-int8")
    assert p.nnz == int(mask.sum())
    assert (p.unpack(torch.float32)[~mask] == 0).all()


def bad_variants(p):
    s = p.scales
    yield dict(scales=None), "needs float32 scales"
    yield dict(scales=s.to(torch.bfloat16)), "needs float32 scales"
    yield dict(scales=s[:, :-1] if s.shape[1] > 1 else s[:-1]), "scales must be a float32"
    nan = s.clone()
    nan[0, 0, 0] = float("nan")
    yield dict(scales=nan), "finite and non-negative"
    yield dict(scales=-s), "finite and non-negative"
    v = p.values.clone()
    v[0] = -128
    yield dict(values=v), r"\[-127, 127\]"
    yield dict(values=p.values.to(torch.bfloat16)), "values must be a 1-D int8"
    yield dict(values=p.values[:-1]), "values hold"


@pytest.mark.parametrize("storage", INT8)
def test_tampered_int8_weight_is_rejected(storage):
    p = pack(torch.randn(20, 200), storage=storage)
    fields = dict(values=p.values, bitmap=p.bitmap, offsets=p.offsets, scales=p.scales)
    for change, message in bad_variants(p):
        kw = {**fields, **change}
        with pytest.raises(PackedWeightError, match=message):
            PackedWeight(p.shape, storage, kw["values"], kw["bitmap"], kw["offsets"], kw["scales"])
    if storage == "bitmap-int8":
        bad = p.offsets.clone()
        bad[1] -= 1
        with pytest.raises(PackedWeightError, match="offsets inconsistent"):
            PackedWeight(p.shape, storage, p.values, p.bitmap, bad, p.scales)
    bf = pack(torch.randn(20, 200), storage="bitmap-bf16")
    with pytest.raises(PackedWeightError, match="has no scales"):
        PackedWeight(bf.shape, bf.storage, bf.values, bf.bitmap, bf.offsets, p.scales)


def test_pack_rejects_non_finite_weight_for_int8():
    w = torch.randn(16, 32)
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match="finite weight"):
        pack(w, storage="bitmap-int8")


# ---- kernels ----


@pytest.mark.parametrize("kernel", RUNNABLE)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.sampled_from([1, 15, 16, 17, 33, 64, 100]),
    k=st.sampled_from([1, 15, 17, 33, 100, 127, 129, 200, 577, 1025]),
    m=st.sampled_from([1, 2, 3, 4, 5, 16, 17, 33, 300]),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9]),
    with_bias=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    storage=st.sampled_from(INT8),
    seed=st.integers(0, 999),
)
def test_int8_kernel_matches_reference(
    kernel, threads, n, k, m, sparsity, with_bias, dtype, storage, seed
):
    if kernel in ("portable", "amx_emulated") and n * k * m > 2_000_000:
        m = 5  # keep the scalar kernel's share of the test time small
    p = pack(random_weight(n, k, sparsity, seed).float(), storage=storage)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n) if with_bias else None
    y = packed_linear(x, p, bias, kernel=kernel)
    assert_matches_dequantized(y, x, p, bias, kernel)


@pytest.mark.parametrize("kernel", RUNNABLE)
@pytest.mark.parametrize("storage", INT8)
@pytest.mark.parametrize("m", [1, 4, 9, 64])
def test_int8_larger_shape(kernel, threads, storage, m):
    # Several 4-group streams per thread, many scale blocks, varied row scales; 19 column
    # groups: the AMX prefill converts them in chunks of 64 groups, so use more below
    w = random_weight(300, 2100, 0.5, 2).float() * torch.rand(300, 1) * 3
    p = pack(w, storage=storage)
    x = torch.randn(m, 2100, dtype=torch.bfloat16)
    bias = torch.randn(300)
    y = packed_linear(x, p, bias, kernel=kernel)
    assert_matches_dequantized(y, x, p, bias, kernel)


@pytest.mark.parametrize("kernel", [k for k in RUNNABLE if k in AMX])
@pytest.mark.parametrize("storage", INT8)
def test_int8_amx_prefill_chunks_and_bf16_weights(kernel, threads, storage):
    # 1100 outputs = 69 column groups: a thread's range crosses the 64-group conversion
    # chunks; the result is the product with the bf16-rounded weights, to fp32 sum order
    w = random_weight(1100, 300, 0.5, 4).float() * torch.rand(1100, 1) * 2
    p = pack(w, storage=storage)
    x = torch.randn(40, 300, dtype=torch.float32)
    bias = torch.randn(1100)
    y = packed_linear(x, p, bias, kernel=kernel)
    assert_matches_dequantized(y, x, p, bias, weights_bf16=True)
    wb = p.unpack(torch.float32).to(torch.bfloat16).float()  # bf16(q * scale)
    ref = x.to(torch.bfloat16).float() @ wb.T + bias
    tol = FP32_REL * (x.to(torch.bfloat16).float().abs() @ wb.abs().T) + 1e-6
    assert ((y - ref).abs() <= tol).all()


@pytest.mark.parametrize("storage", INT8)
def test_default_ops_and_reference_linear(storage):
    p = pack(random_weight(50, 300, 0.6, 4).float(), storage=storage)
    for m in (1, 3, 40):
        x = torch.randn(m, 300)
        y = packed_linear(x, p)
        bf16 = weights_in_bf16(None, m)
        assert_matches_dequantized(y, x, p)
        rtol, atol = (2e-2, 0.2) if bf16 else (1e-4, 1e-4)
        assert torch.allclose(y, reference_linear(x, p), rtol=rtol, atol=atol)


@pytest.mark.parametrize("kernel", RUNNABLE)
def test_int8_non_contiguous_and_empty_input(kernel):
    p = pack(random_weight(24, 130, 0.5, 3).float(), storage="bitmap-int8")
    x = torch.randn(130, 5, dtype=torch.bfloat16).t()
    assert_matches_dequantized(packed_linear(x, p, kernel=kernel), x, p, kernel=kernel)
    assert packed_linear(torch.randn(0, 130), p, kernel=kernel).shape == (0, 24)


def test_forced_kernel_env_runs_int8(monkeypatch):
    p = pack(random_weight(40, 200, 0.5, 6).float(), storage="bitmap-int8")
    for name in [k for k in RUNNABLE if k != "amx_emulated"]:
        monkeypatch.setenv("SPARAMX_KERNEL", name)
        info = sparamx.kernel_info()
        # forced amx: M <= 4 inside it runs the AVX-512 int8 streams
        assert info["paths"]["int8_decode"] == info["paths"]["int8_prefill"] == name
        for m in (1, 20):
            x = torch.randn(m, 200)
            assert_matches_dequantized(packed_linear(x, p), x, p)
    monkeypatch.setenv("SPARAMX_KERNEL", "nonsense")
    with pytest.raises(RuntimeError, match="unknown kernel 'nonsense'"):
        packed_linear(torch.randn(1, 200), p)


def test_int8_raw_op_errors():
    p = pack(torch.randn(16, 200), storage="bitmap-int8")
    d = pack(torch.randn(16, 200), storage="dense-int8")
    x = torch.randn(2, 200)
    ops = torch.ops.sparamx
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32"):
        ops.sparse_linear_int8(x, p.bitmap, p.values, p.offsets, p.scales[:, :1], None, 16, 200)
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32"):
        ops.dense_linear_int8(x, d.values, d.scales.double(), None, 16, 200)
    with pytest.raises(RuntimeError, match="int8 layouts need values"):
        ops.dense_linear_int8(x, d.values.to(torch.bfloat16), d.scales, None, 16, 200)
    with pytest.raises(RuntimeError, match="offsets do not match values"):
        ops.sparse_linear_int8(x, p.bitmap, p.values[:-1], p.offsets, p.scales, None, 16, 200)
    with pytest.raises(RuntimeError, match="dense values must hold"):
        ops.dense_linear_int8(x, d.values[:-1], d.scales, None, 16, 200)
    with pytest.raises(RuntimeError, match="features but the weight has K=200"):
        ops.dense_linear_int8(torch.randn(2, 199), d.values, d.scales, None, 16, 200)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.dense_linear_int8(x, d.values, d.scales, torch.randn(3), 16, 200)


def test_opcheck_int8_ops():
    p = pack(random_weight(20, 140, 0.5, 7).float(), storage="bitmap-int8")
    d = pack(random_weight(20, 140, 0.0, 7).float(), storage="dense-int8")
    x = torch.randn(3, 140, dtype=torch.bfloat16)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.sparamx.sparse_linear_int8.default,
        (x, p.bitmap, p.values, p.offsets, p.scales, torch.randn(20), 20, 140),
        test_utils=utils,
    )
    torch.library.opcheck(
        torch.ops.sparamx.dense_linear_int8.default,
        (x, d.values, d.scales, None, 20, 140),
        test_utils=utils,
    )
    torch.library.opcheck(
        torch.ops.sparamx.linear_int8_with_kernel.default,
        (x, None, d.values, None, d.scales, None, 20, 140, "portable"),
        test_utils=utils,
    )


# ---- layers ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "cls, storage", [(SparseLinear, "bitmap-int8"), (DenseLinear, "dense-int8")]
)
def test_int8_layer_forward(dtype, lead, bias, cls, storage):
    lin = masked_linear(40, 150, bias=bias)
    layer = cls.from_linear(lin, storage=storage)
    assert layer.storage == storage and layer.scales.dtype == torch.float32
    assert (layer.bitmap is None) == (storage == "dense-int8")
    x = torch.randn(*lead, 150, dtype=dtype)
    y = layer(x)
    assert y.shape == (*lead, 40) and y.dtype == dtype
    b = None if lin.bias is None else lin.bias.detach()
    assert_matches_dequantized(y.reshape(-1, 40), x.reshape(-1, 150), layer.packed, b)
    # against the original float layer: int8 error only
    ref = lin(x.float().to(torch.bfloat16).float()).reshape(-1, 40)
    assert (y.float().reshape(-1, 40) - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    assert "storage=" + storage in repr(layer)


def test_int8_layer_state_dict_and_dtype_moves():
    layer = SparseLinear.from_linear(masked_linear(33, 130), storage="bitmap-int8")
    sd = layer.state_dict()
    assert {"values", "bitmap", "offsets", "scales", "bias"} <= set(sd)
    assert sd["values"].dtype == torch.int8 and sd["scales"].dtype == torch.float32
    layer.to(torch.bfloat16)  # the model's dtype; the format's tensors stay as they are
    assert layer.scales.dtype == torch.float32 and layer.values.dtype == torch.int8
    assert layer.bias.dtype == torch.bfloat16
    layer.float()
    assert layer.scales.dtype == torch.float32
    x = torch.randn(2, 130, dtype=torch.bfloat16)
    assert_matches_dequantized(layer(x), x, layer.packed, layer.bias)
    with pytest.raises(ValueError, match="dense-int8 or dense-bf16 only"):
        DenseLinear.from_linear(masked_linear(16, 32), storage="bitmap-int8")


def test_torch_compile_int8_model_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        SparseLinear.from_linear(masked_linear(96, 130, seed=1), storage="bitmap-int8"),
        nn.ReLU(),
        DenseLinear.from_linear(masked_linear(48, 96, seed=2), storage="dense-int8"),
        nn.ReLU(),
        SparseLinear.from_linear(masked_linear(20, 48, seed=3), storage="bitmap-bf16"),
    ).eval()
    compiled = torch.compile(model, fullgraph=True)
    for shape in [(1, 130), (3, 7, 130)]:
        x = torch.randn(*shape, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(compiled(x), model(x))


# ---- artifacts ----


def tiny_model(storage, sparsity=0.5):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", num_hidden_layers=1), dtype=torch.bfloat16
    )
    zero_random_weights(model, sparsity)
    sparamx.swap_linears(model, storage=storage)
    return model.eval()


IDS = torch.tensor([[3, 17, 250, 99, 0, 42, 7]])


@pytest.fixture(scope="module")
def saved_int8(tmp_path_factory):
    model = tiny_model("bitmap-int8")
    # mixed: one dense-int8 layer and one bitmap-bf16 one in the same artifact
    mlp = model.model.layers[0].mlp
    mlp.down_proj = DenseLinear(pack(mlp.down_proj.weight, storage="dense-int8"))
    mlp.up_proj = SparseLinear(pack(mlp.up_proj.packed.unpack(), storage="bitmap-bf16"))
    path = tmp_path_factory.mktemp("int8") / "art"
    sparamx.save(model, tiny_tokenizer(), path)
    with torch.no_grad():
        ref = model(IDS).logits
    return path, ref


def test_int8_artifact_round_trip(saved_int8):
    path, ref = saved_int8
    m = read_manifest(path)
    assert m["format_version"] == sparamx.FORMAT_VERSION == 2
    storages = {lay["name"]: lay["storage"] for lay in m["layers"]}
    assert storages["model.layers.0.mlp.down_proj"] == "dense-int8"
    assert storages["model.layers.0.mlp.up_proj"] == "bitmap-bf16"
    assert storages["model.layers.0.self_attn.q_proj"] == "bitmap-int8"
    for verify in ("invariants", "checksums"):
        loaded, _ = sparamx.load(path, verify=verify)
        q = loaded.model.layers[0].self_attn.q_proj
        assert q.storage == "bitmap-int8" and q.scales.dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, ref)
    summary = sparamx.artifact.check(path)
    assert summary["int8_layers"] == 6 and summary["layers"] == 7


def test_tied_head_packed_int8_keeps_the_bf16_embedding(tmp_path, caplog):
    """A tied lm_head packed as dense-int8 cannot serve the embedding lookup (that needs
    bf16 rows): the embedding keeps its exact bf16 weight, stored beside the int8 head,
    and the artifact generates the in-memory model's tokens."""
    import logging

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama", num_hidden_layers=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    zero_random_weights(model.model.layers, 0.5)
    emb = model.model.embed_tokens.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="sparamx.layers"):
        sparamx.swap_linears(model, exclude=[], storage="auto-int8")
    assert "lm_head is dense-int8" in caplog.text and "keep separate copies" in caplog.text
    assert model.lm_head.storage == "dense-int8"
    assert model.model.layers[0].mlp.up_proj.storage == "bitmap-int8"
    assert type(model.model.embed_tokens) is nn.Embedding
    assert torch.equal(model.model.embed_tokens.weight, emb)
    with torch.no_grad():
        want = model.generate(IDS, max_new_tokens=16, do_sample=False)
        logits = model(IDS).logits
    sparamx.save(model, tiny_tokenizer(), tmp_path / "art")
    m = read_manifest(tmp_path / "art")
    assert m["tied"] == {} and m["packed_embeddings"] == {}
    loaded, _ = sparamx.load(tmp_path / "art", verify="checksums")
    assert loaded.lm_head.storage == "dense-int8" and loaded.lm_head.scales is not None
    assert torch.equal(loaded.model.embed_tokens.weight, emb)
    with torch.no_grad():
        assert torch.equal(loaded.generate(IDS, max_new_tokens=16, do_sample=False), want)
        assert torch.equal(loaded(IDS).logits, logits)
    # verify's reference: the head's dequantized weight, the tied embedding left alone
    from sparamx.pipeline.verify import dequantize_into

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    assert dequantize_into(ref, loaded) == 15
    assert torch.equal(ref.model.embed_tokens.weight, emb)
    head = loaded.lm_head.packed.unpack(torch.float32).bfloat16()
    assert torch.equal(ref.lm_head.weight, head) and not torch.equal(head, emb)


def rewrite_tensor(path, change):
    """Apply ``change(tensors)`` to the safetensors file and fix the recorded file size
    (not the tensor records: invariants-only loads must catch the damage themselves)."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(f)
    change(tensors)
    save_file(tensors, f)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = f.stat().st_size
    manifest.pop("checksums")
    (path / MANIFEST).write_text(json.dumps(manifest))


Q = "model.layers.0.self_attn.q_proj"


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.update({Q + ".scales": t[Q + ".scales"][:, :, :8].contiguous()}),
            "scales must",
        ),
        (lambda t: t.update({Q + ".scales": t[Q + ".scales"].half()}), "float32 scales"),
        (lambda t: t.update({Q + ".scales": _nan(t[Q + ".scales"])}), "finite"),
        (lambda t: t.pop(Q + ".scales"), "scales missing"),
        (lambda t: t.update({Q + ".values": t[Q + ".values"][:-5].clone()}), "values hold"),
        (lambda t: t.update({Q + ".values": t[Q + ".values"].to(torch.int16)}), "int8"),
    ],
)
def test_corrupt_int8_tensors_are_artifact_errors(saved_int8, tmp_path, change, message):
    path = tmp_path / "art"
    shutil.copytree(saved_int8[0], path)
    rewrite_tensor(path, change)
    with pytest.raises(ArtifactError, match=message):
        sparamx.load(path)


def test_truncated_int8_artifact(saved_int8, tmp_path):
    path = tmp_path / "art"
    shutil.copytree(saved_int8[0], path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ArtifactError, match="truncated"):
        sparamx.load(path)


def as_version_1(path):
    """What the version-1 code wrote: the same files with format_version 1."""
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = 1
    manifest["checksums"]["manifest"] = manifest_digest(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def test_version_1_artifact_still_loads(tmp_path):
    model = tiny_model("auto")
    sparamx.save(model, tiny_tokenizer(), tmp_path / "v1")
    as_version_1(tmp_path / "v1")
    assert read_manifest(tmp_path / "v1")["format_version"] == 1
    loaded, _ = sparamx.load(tmp_path / "v1", verify="checksums")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_version_1_manifest_cannot_name_int8(saved_int8, tmp_path):
    path = tmp_path / "art"
    shutil.copytree(saved_int8[0], path)
    as_version_1(path)
    with pytest.raises(ArtifactError, match="format_version 1 does not have"):
        sparamx.load(path)
