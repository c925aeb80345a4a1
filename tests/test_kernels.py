"""Every native kernel (portable, AVX2, AVX-512 and AMX where the CPU has them, and the AMX
kernel on emulated tiles everywhere) against the pure-PyTorch reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_matches_reference

import sparamx
from sparamx.format import PackedWeight, pack
from sparamx.ops import packed_linear

INFO = sparamx.kernel_info()
CPU = INFO["cpu"]
RUNNABLE = ["portable", "amx_emulated"]
if all(CPU[f] for f in ("avx2", "fma", "f16c", "bmi2", "popcnt", "os_avx")):
    RUNNABLE.append("avx2")
if all(CPU[f] for f in ("avx512f", "avx512_bf16", "avx512_vbmi", "avx512_vbmi2", "os_avx512")):
    RUNNABLE.append("avx512")
if CPU["os_amx"] and CPU["amx_bf16"]:
    RUNNABLE.append("amx")

DIMS_N = st.sampled_from([1, 15, 16, 17, 33, 64, 100])
DIMS_K = st.sampled_from([1, 15, 17, 32, 33, 64, 100, 577, 4097])
ROWS = st.sampled_from([1, 2, 3, 4, 5, 7, 16, 17, 33, 300])
SPARSITY = st.sampled_from([0.0, 0.5, 0.7, 0.9, 1.0])


def random_weight(n, k, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("kernel", RUNNABLE)
# The thread count is fixed per test (parametrized), which is what we want across examples.
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=DIMS_N,
    k=DIMS_K,
    m=ROWS,
    sparsity=SPARSITY,
    with_bias=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    storage=st.sampled_from(["bitmap-bf16", "dense-bf16"]),
    seed=st.integers(0, 999),
)
def test_kernel_matches_reference(
    kernel, threads, n, k, m, sparsity, with_bias, dtype, storage, seed
):
    if kernel == "portable" and n * k * m > 2_000_000:
        m = 5  # keep the scalar kernel's share of the test time small
    w = random_weight(n, k, sparsity, seed)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n) if with_bias else None
    y = packed_linear(x, pack(w, storage=storage), bias, kernel=kernel)
    assert_matches_reference(y, x, w, bias)


@pytest.mark.parametrize("kernel", RUNNABLE)
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_llama_sized_shape(kernel, threads, m):
    w = random_weight(1024, 4096, 0.5, 1)
    x = torch.randn(m, 4096, dtype=torch.bfloat16)
    assert_matches_reference(packed_linear(x, pack(w), kernel=kernel), x, w)


@pytest.mark.parametrize(
    "kernel", ["amx_emulated", "amx"] if "amx" in RUNNABLE else ["amx_emulated"]
)
@pytest.mark.parametrize("storage", ["bitmap-bf16", "dense-bf16"])
@pytest.mark.parametrize("m", [290, 520])
def test_prefill_blocking_boundaries(kernel, threads, storage, m):
    # The AMX prefill blocks rows by 256 and column groups by 128 per pass, and walks K in
    # chunks of 16 tiles: N = 2090 gives a pass of 128 groups and one of 3 (a pair and a
    # lone group), K = 1100 two full chunks and a short one, m = 520 a lone 8-row block;
    # m = 290 keeps x under 1 MiB (narrow passes), m = 520 does not (wide passes).
    w = random_weight(2090, 1100, 0.6, 3)
    x = torch.randn(m, 1100, dtype=torch.bfloat16)
    bias = torch.randn(2090)
    y = packed_linear(x, pack(w, storage=storage), bias, kernel=kernel)
    assert_matches_reference(y, x, w, bias)


@pytest.mark.parametrize("kernel", RUNNABLE)
def test_all_zero_rows_and_layer(kernel):
    w = random_weight(40, 70, 0.5, 2)
    w[3] = 0
    w[16:32] = 0  # a whole column group
    x = torch.randn(6, 70)
    bias = torch.randn(40)
    y = packed_linear(x, pack(w, storage="bitmap-bf16"), bias, kernel=kernel)
    assert_matches_reference(y, x, w, bias)
    zero = torch.zeros(40, 70, dtype=torch.bfloat16)
    y0 = packed_linear(x, pack(zero, storage="bitmap-bf16"), bias, kernel=kernel)
    assert torch.allclose(y0, bias.expand(6, 40))


@pytest.mark.parametrize("kernel", RUNNABLE)
def test_non_contiguous_and_empty_input(kernel):
    w = random_weight(24, 64, 0.5, 3)
    p = pack(w)
    x = torch.randn(64, 5, dtype=torch.bfloat16).t()  # non-contiguous [5, 64]
    assert_matches_reference(packed_linear(x, p, kernel=kernel), x, w)
    xs = torch.randn(5, 128, dtype=torch.bfloat16)[:, ::2]  # strided columns
    assert_matches_reference(packed_linear(xs, p, kernel=kernel), xs, w)
    assert packed_linear(torch.randn(0, 64), p, kernel=kernel).shape == (0, 24)


def test_default_ops_match_reference():
    w = random_weight(50, 90, 0.6, 4)
    x = torch.randn(3, 90, dtype=torch.bfloat16)
    assert_matches_reference(packed_linear(x, pack(w)), x, w)
    assert_matches_reference(packed_linear(x, pack(w, storage="dense-bf16")), x, w)


def test_bad_inputs_give_clear_errors():
    p = pack(random_weight(16, 32, 0.5, 5))
    with pytest.raises(RuntimeError, match="features but the weight has K=32"):
        packed_linear(torch.randn(2, 31), p)
    with pytest.raises(RuntimeError, match="dtype must be bfloat16 or float32"):
        packed_linear(torch.randn(2, 32, dtype=torch.float16), p)
    with pytest.raises(RuntimeError, match="dtype must be bfloat16 or float32"):
        packed_linear(torch.ones(2, 32, dtype=torch.int64), p)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        packed_linear(torch.randn(32), p)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        packed_linear(torch.randn(2, 32), p, torch.randn(15))
    with pytest.raises(ValueError, match="kernel 'fast' is not one of"):
        packed_linear(torch.randn(2, 32), p, kernel="fast")
    # Raw op with values that do not match the offsets.
    with pytest.raises(RuntimeError, match="offsets do not match values"):
        torch.ops.sparamx.sparse_linear(
            torch.randn(1, 32), p.bitmap, p.values[:-2], p.offsets, None, 16, 32
        )
    with pytest.raises(RuntimeError, match="bitmap must be"):
        torch.ops.sparamx.sparse_linear(
            torch.randn(1, 32), p.bitmap.long(), p.values, p.offsets, None, 16, 32
        )


def test_forced_kernel_env(monkeypatch):
    w = random_weight(16, 32, 0.5, 6)
    x = torch.randn(2, 32)
    monkeypatch.setenv("SPARAMX_KERNEL", "portable")
    assert sparamx.kernel_info()["decode"] == "portable"
    assert_matches_reference(packed_linear(x, pack(w)), x, w)
    monkeypatch.setenv("SPARAMX_KERNEL", "nonsense")
    with pytest.raises(RuntimeError, match="unknown kernel 'nonsense'"):
        packed_linear(x, pack(w))
    if "amx" not in RUNNABLE:
        monkeypatch.setenv("SPARAMX_KERNEL", "amx")
        with pytest.raises(RuntimeError, match="kernel 'amx' needs AMX"):
            packed_linear(x, pack(w))
    if "avx2" in RUNNABLE:
        monkeypatch.setenv("SPARAMX_KERNEL", "avx2")
        info = sparamx.kernel_info()
        assert info["decode"] == info["prefill"] == "avx2"
        assert_matches_reference(packed_linear(x, pack(w)), x, w)
        x_prefill = torch.randn(40, 32)
        assert_matches_reference(packed_linear(x_prefill, pack(w)), x_prefill, w)


def test_kernel_info_reports_features_and_paths():
    info = sparamx.kernel_info()
    assert {"cpu", "compiled", "decode", "prefill", "threads"} <= set(info)
    assert "portable" in info["compiled"] and "amx_emulated" in info["compiled"]
    assert info["decode"] in ("amx", "avx512", "avx2", "portable")


def test_opcheck_custom_ops():
    p = pack(random_weight(20, 40, 0.5, 7))
    d = pack(random_weight(20, 40, 0.0, 7), storage="dense-bf16")
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    torch.library.opcheck(
        torch.ops.sparamx.sparse_linear.default,
        (x, p.bitmap, p.values, p.offsets, torch.randn(20), 20, 40),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.sparamx.dense_linear.default,
        (x, d.values, None, 20, 40),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_packed_weight_from_raw_tensors_validates():
    p = pack(random_weight(16, 32, 0.5, 8))
    bad = p.offsets.clone()
    bad[1] = 0
    with pytest.raises(sparamx.PackedWeightError, match="offsets inconsistent"):
        PackedWeight(p.shape, p.storage, p.values, p.bitmap, bad)


@pytest.mark.parametrize("nbytes", [0, 63, 64, 1 << 20, (1 << 20) + 200])
def test_read_probe_checksum(threads, nbytes):
    # The bandwidth probe of the benchmarks must read every whole 64-byte line.
    buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    lines = buf[: nbytes // 64 * 64].view(torch.int64).view(-1, 8)
    expect = 0
    for col in lines.t():
        for v in col.tolist():
            expect ^= v
    assert int(torch.ops.sparamx.read_probe(buf)) == expect
