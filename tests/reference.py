"""Error tolerances for kernel-vs-reference comparisons, defined once.

Kernels and the reference both multiply bf16 by bf16 exactly and accumulate in fp32,
in different orders: the fp32 difference is bounded by a few ulps of the sum of
|products|. A bf16 output may then round to the neighbouring bf16 (2**-8 relative).
"""

import torch

FP32_REL = 2e-5  # relative to sum |x_k w_k|; fp32 eps is 1.2e-7, K up to ~1e4
BF16_REL = 2.0**-7  # one bf16 ulp of the result


def assert_matches_reference(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """``y`` must equal bf16(x) @ w.T (+ bias) within the tolerances above."""
    xb = x.to(torch.bfloat16).float()
    wf = w.to(torch.bfloat16).float()
    ref = xb @ wf.T
    if bias is not None:
        ref = ref + bias.float()
    magnitude = xb.abs() @ wf.abs().T
    tol = FP32_REL * magnitude + 1e-6
    if y.dtype == torch.bfloat16:
        tol = tol + BF16_REL * ref.abs()
    assert y.dtype == x.dtype, f"output dtype {y.dtype} != input dtype {x.dtype}"
    assert y.shape == ref.shape, f"output shape {tuple(y.shape)} != {tuple(ref.shape)}"
    err = (y.float() - ref).abs()
    bad = err > tol
    worst = int(err.argmax())
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} outputs off the reference; worst error "
        f"{float(err.max()):.3g} (tolerance there {float(tol.flatten()[worst]):.3g})"
    )


# Decode attention over the KV cache: the kernels multiply the softmax weights by V in
# bf16 (as FlashAttention and torch's CPU flash kernel do), each weight off by at most
# 2**-9 relative; so the output may be off by about 2**-8 of the largest |v|.
KV_ATTN_ABS = 2.0**-7  # times max |v| of the (batch, KV head)
