"""SparseLinear as a drop-in nn.Linear, the model swap helper, and torch.compile."""

import pytest
import torch
from conftest import masked_linear
from reference import assert_matches_reference
from torch import nn

from sparamx import SparseLinear, swap_linears


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (1, 1, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_any_leading_dims(dtype, lead, bias):
    lin = masked_linear(33, 70, bias)
    sl = SparseLinear.from_linear(lin)
    x = torch.randn(*lead, 70, dtype=dtype)
    y = sl(x)
    assert y.shape == (*lead, 33) and y.dtype == dtype
    w = lin.weight.detach()
    b = lin.bias.detach() if bias else None
    assert_matches_reference(y.reshape(-1, 33), x.reshape(-1, 70), w, b)


def test_mask_argument_and_weight_property():
    lin = masked_linear(16, 32, sparsity=0.0)
    mask = torch.rand(16, 32) < 0.4
    sl = SparseLinear.from_linear(lin, mask)
    expected = torch.where(mask, lin.weight.detach(), 0).to(torch.bfloat16)
    assert torch.equal(sl.weight, expected)
    assert sl.storage == "bitmap-bf16"


def test_dense_storage_for_unpruned_linear():
    lin = masked_linear(40, 64, sparsity=0.0)
    sl = SparseLinear.from_linear(lin)
    assert sl.storage == "dense-bf16" and sl.bitmap is None
    x = torch.randn(4, 64)
    assert_matches_reference(sl(x), x, lin.weight.detach(), lin.bias.detach())


def test_wrong_input_features_is_a_clear_error():
    sl = SparseLinear.from_linear(masked_linear(16, 32))
    with pytest.raises(ValueError, match="expects input with 32 features"):
        sl(torch.randn(2, 31))
    with pytest.raises(TypeError, match="expects nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_state_dict_round_trip():
    sl = SparseLinear.from_linear(masked_linear(20, 40))
    sd = sl.state_dict()
    assert set(sd) == {"values", "bitmap", "offsets", "bias"}
    x = torch.randn(3, 40)
    assert torch.equal(SparseLinear(sl.packed, sd["bias"])(x), sl(x))


def test_swap_linears_skips_lm_head_by_default(tiny_llama):
    names = swap_linears(tiny_llama)
    assert "lm_head" not in names
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert isinstance(tiny_llama.model.layers[0].mlp.down_proj, SparseLinear)
    assert isinstance(tiny_llama.lm_head, nn.Linear)


def test_swap_linears_patterns(tiny_llama):
    names = swap_linears(tiny_llama, include=["*.mlp.*"], exclude=[])
    assert names and all(".mlp." in n for n in names)


def test_swapped_model_matches_masked_dense_model(tiny_llama):
    model = tiny_llama.to(torch.bfloat16)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight[torch.rand_like(mod.weight, dtype=torch.float32) < 0.5] = 0
    ids = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits.float()
        swap_linears(model)
        got = model(ids).logits.float()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_torch_compile_gives_same_output():
    sl = SparseLinear.from_linear(masked_linear(48, 96))
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    compiled = torch.compile(sl, fullgraph=True)
    assert torch.equal(compiled(x), sl(x))


def test_dense_linear_uses_the_dense_layout():
    from sparamx.layers import DenseLinear

    lin = masked_linear(40, 70, sparsity=0.5)
    dl = DenseLinear.from_linear(lin)
    assert dl.storage == "dense-bf16" and dl.bitmap is None
    x = torch.randn(3, 70, dtype=torch.bfloat16)
    assert_matches_reference(dl(x), x, lin.weight.detach(), lin.bias.detach())
    with pytest.raises(ValueError, match="dense-bf16 only"):
        DenseLinear.from_linear(lin, storage="bitmap-bf16")


def test_tied_lm_head_shares_one_copy_with_the_embedding():
    from transformers import AutoModelForCausalLM

    from sparamx.layers import PackedEmbedding

    torch.manual_seed(0)
    from conftest import tiny_config

    cfg = tiny_config("llama", tie_word_embeddings=True, vocab_size=100)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 100, (2, 7))
    emb_ref = model.get_input_embeddings()(ids)
    with torch.no_grad():
        ref = model(ids).logits.float()
    swap_linears(model, exclude=[])
    model.tie_weights()  # transformers/lm-eval call this; the packed copy is already shared
    emb = model.get_input_embeddings()
    assert isinstance(emb, PackedEmbedding) and emb.values is model.lm_head.values
    assert torch.equal(emb(ids), emb_ref)
    assert torch.equal(emb.weight, model.lm_head.weight)
    with torch.no_grad():
        got = model(ids).logits.float()
    assert (got - ref).norm() <= 0.02 * ref.norm()
