"""sparamx::rms_norm gives bitwise the eager output of transformers' RMSNorm modules,
and the lean decode loop uses it only where it does."""

import os
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import sparamx.ops  # noqa: F401  (registers the ops)
from sparamx.generate import _native_norm


def _module(cls, width: int, dtype: torch.dtype, seed: int):
    mod = cls(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(seed)))
    return mod


# Both builds of the fused loops: the portable one and (on CPUs with AVX2) the AVX2 one.
@pytest.mark.parametrize("kernel", ["auto", "portable"])
@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(1, 700),
    rows=st.integers(1, 5),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    gemma=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_is_bitwise_eager(kernel, width, rows, dtype, gemma, seed):
    mod = _module(GemmaRMSNorm if gemma else LlamaRMSNorm, width, dtype, seed)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with _kernel_env(kernel):
        got = torch.ops.sparamx.rms_norm(x, mod.weight, 1e-5, gemma)
    want = mod(x)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


@contextmanager
def _kernel_env(kernel: str):
    old = os.environ.get("SPARAMX_KERNEL")
    os.environ["SPARAMX_KERNEL"] = kernel
    try:
        yield
    finally:
        if old is None:
            del os.environ["SPARAMX_KERNEL"]
        else:
            os.environ["SPARAMX_KERNEL"] = old


def test_native_norm_picks_the_matching_form():
    llama = _module(LlamaRMSNorm, 64, torch.bfloat16, 0)
    gemma = _module(GemmaRMSNorm, 64, torch.bfloat16, 0)
    assert _native_norm(llama, torch.bfloat16).keywords["offset_weight"] is False
    assert _native_norm(gemma, torch.bfloat16).keywords["offset_weight"] is True

    class ScaledNorm(LlamaRMSNorm):  # a norm that is neither form: stays on its forward
        def forward(self, x):
            return super().forward(x) * 2

    assert _native_norm(_module(ScaledNorm, 64, torch.bfloat16, 0), torch.bfloat16) is None


def test_rms_norm_rejects_a_mismatched_weight():
    with pytest.raises(RuntimeError, match="does not match the last dimension"):
        torch.ops.sparamx.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-5, False)


def test_rms_norm_traces_under_compile():
    mod = _module(LlamaRMSNorm, 48, torch.bfloat16, 3)
    x = torch.randn(2, 48).to(torch.bfloat16)
    fn = torch.compile(
        lambda t: torch.ops.sparamx.rms_norm(t, mod.weight, 1e-5, False),
        backend="aot_eager",
        fullgraph=True,
    )
    assert torch.equal(fn(x), mod(x))
