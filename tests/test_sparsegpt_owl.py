"""Tests for SparseGPT (reconstruction quality, exact counts, the Hessian and its failure
modes), the OWL allocation (exact mean, bounds, outlier-heavy layers pruned less), RIA,
and both through ``pruning.prune``, the streaming path and the pipeline's config."""

import copy
import logging
import math

import pytest
import torch
from conftest import tiny_config
from torch import nn

import pruning
from pruning.owl import OWL, outlier_ratio, owl_sparsities
from pruning.scores import magnitude_score, mask_from_scores, prune_count, ria_score, wanda_score
from pruning.sparsegpt import (
    SingularHessianError,
    block_drop_counts,
    input_hessians,
    inverse_hessian_factor,
    sparsegpt_prune,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def correlated_inputs(tokens=1024, k=160, seed=0):
    """Calibration-like inputs: correlated columns of uneven scale (as LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.1
    return (torch.randn(tokens, k, generator=g) @ mix) * scale


def rel_error(x, w, w_pruned):
    return float((x @ w.T - x @ w_pruned.T).norm() / (x @ w.T).norm())


def tiny_model(arch="llama", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()


def random_ids(samples=4, seqlen=24, vocab=257, seed=1):
    return torch.randint(0, vocab, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- SparseGPT
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_reconstructs_the_layer_output_better_than_wanda_and_magnitude(sparsity):
    x = correlated_inputs()
    w = torch.randn(48, x.shape[1], generator=torch.Generator().manual_seed(3))
    pruned, keep = sparsegpt_prune(w, (x.T @ x).double(), sparsity, block_size=64)
    wanda = w * mask_from_scores(wanda_score(w, x.pow(2).sum(0)), sparsity)
    magnitude = w * mask_from_scores(magnitude_score(w), sparsity)
    errors = [rel_error(x, w, p) for p in (pruned, wanda, magnitude)]
    assert errors[0] < 0.95 * errors[1] < errors[2], errors
    assert torch.equal(pruned == 0, ~keep)


@pytest.mark.parametrize("k, block", [(160, 64), (100, 128), (37, 16)])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_zeros_are_exact_per_row_and_per_matrix(k, block, sparsity):
    x = correlated_inputs(tokens=400, k=k)
    w = torch.randn(20, k, generator=torch.Generator().manual_seed(k))
    h = (x.T @ x).double()
    pruned, keep = sparsegpt_prune(w, h, sparsity, "row", block_size=block)
    assert ((pruned == 0).sum(1) == prune_count(sparsity, k)).all()
    assert torch.equal(pruned == 0, ~keep)
    pruned, keep = sparsegpt_prune(w, h, sparsity, "layer", block_size=block)
    assert int((pruned == 0).sum()) == prune_count(sparsity, w.numel())


def test_block_drop_counts_add_up_to_the_exact_total():
    assert sum(block_drop_counts(0.7, 1, 576, 128, "row")) == prune_count(0.7, 576)
    counts = block_drop_counts(0.7, 9, 1000, 128, "layer")
    assert len(counts) == 8 and sum(counts) == prune_count(0.7, 9 * 1000)


def test_sparsegpt_at_zero_sparsity_leaves_the_weight_unchanged():
    x = correlated_inputs(tokens=300, k=40)
    w = torch.randn(8, 40)
    pruned, keep = sparsegpt_prune(w, (x.T @ x).double(), 0.0, block_size=16)
    assert keep.all() and torch.allclose(pruned, w, atol=1e-6)


def test_dead_inputs_are_pruned_first_and_give_finite_weights():
    x = correlated_inputs(tokens=300, k=32)
    x[:, [3, 17]] = 0  # inputs that never fire on the calibration set
    w = torch.randn(6, 32)
    pruned, keep = sparsegpt_prune(w, (x.T @ x).double(), 0.25, block_size=8)
    assert torch.isfinite(pruned).all()
    assert not keep[:, [3, 17]].any()


def test_hessian_hooks_sum_x_transpose_x_and_share_one_product_per_input():
    q, k = nn.Linear(12, 5), nn.Linear(12, 7)
    xs = [torch.randn(2, 9, 12) for _ in range(3)]
    with input_hessians({"q": q, "k": k}) as hs:
        for x in xs:
            q(x), k(x)
    flat = torch.cat([x.reshape(-1, 12) for x in xs]).double()
    for name in ("q", "k"):
        assert hs[name].dtype == torch.float64
        torch.testing.assert_close(hs[name], flat.T @ flat, rtol=1e-5, atol=1e-4)


def test_undampable_hessian_is_an_error_naming_the_layer():
    x = torch.randn(10, 32, dtype=torch.float64)  # fewer tokens than inputs: singular
    with pytest.raises(SingularHessianError, match="model.layers.3.mlp.down_proj.*percdamp=0"):
        inverse_hessian_factor(x.T @ x, percdamp=0.0, name="model.layers.3.mlp.down_proj")
    bad = torch.eye(4, dtype=torch.float64)
    bad[1, 2] = float("nan")
    with pytest.raises(SingularHessianError, match="q_proj.*non-finite"):
        sparsegpt_prune(torch.randn(3, 4), bad, 0.5, name="q_proj")


def test_indefinite_hessian_is_retried_with_more_damping(caplog):
    x = correlated_inputs(tokens=200, k=24).double()
    h = x.T @ x
    h -= 0.05 * h.diagonal().mean() * torch.eye(24, dtype=h.dtype)  # fails at 1%, not 10%
    with caplog.at_level(logging.WARNING, logger="pruning.sparsegpt"):
        u = inverse_hessian_factor(h, percdamp=0.01, name="o_proj")
    assert torch.isfinite(u).all() and torch.equal(u, u.triu())
    assert "o_proj" in caplog.text and "retrying" in caplog.text


# --------------------------------------------------------------------------- OWL
def test_owl_mean_is_exactly_the_target_weighted_by_parameters_within_lambda():
    ratios = [0.01, 0.05, 0.02, 0.2, 0.03]
    numels = [100, 300, 100, 50, 1000]
    out = owl_sparsities(ratios, numels, 0.7, 0.08)
    mean = sum(s * n for s, n in zip(out, numels, strict=True)) / sum(numels)
    assert mean == pytest.approx(0.7, abs=1e-12)
    assert all(0.7 - 0.08 - 1e-12 <= s <= 0.7 + 0.08 + 1e-12 for s in out)
    assert max(abs(s - 0.7) for s in out) == pytest.approx(0.08)
    # More outliers, less sparsity: the order of sparsities reverses that of ratios.
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [out[i] for i in order] == sorted(out, reverse=True)


def test_owl_with_equal_ratios_or_nothing_to_prune_is_uniform():
    assert owl_sparsities([0.1, 0.1, 0.1], [5, 6, 7], 0.5, 0.08) == [0.5] * 3
    out = owl_sparsities([0.9, 0.1, 0.2], [0, 10, 10], 0.5, 0.08)
    assert out[0] == 0.5 and out[1] == pytest.approx(0.58) and out[2] == pytest.approx(0.42)


def test_owl_refuses_a_lambda_that_leaves_0_1():
    with pytest.raises(ValueError, match="lambda 0.1 leaves"):
        owl_sparsities([0.1, 0.3], [1, 1], 0.95, 0.1)
    with pytest.raises(ValueError, match="owl lambda"):
        OWL(lam=1.5)


def test_outlier_ratio_counts_scores_above_m_times_the_layer_mean():
    scores = [torch.tensor([[1.0, 1.0, 1.0, 97.0]]), torch.ones(2, 3)]  # mean 10.3
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 10)
    assert outlier_ratio(scores, 10.0) == 0.0


def test_owl_prunes_the_outlier_heavy_layer_less_and_keeps_the_overall_sparsity():
    model = tiny_model(num_hidden_layers=4)
    with torch.no_grad():  # a few huge weights in every linear of layer 2
        for lin in model.model.layers[2].modules():
            if isinstance(lin, nn.Linear):
                lin.weight[:, :3] *= 40
    res = pruning.prune(
        model, "wanda", 0.6, calibration=random_ids(), allocation="owl", progress=False
    )
    layers = res.allocation["layers"]
    assert res.allocation["method"] == "owl" and res.allocation["lambda"] == 0.08
    ratios = [rec["outlier_ratio"] for rec in layers]
    assert max(range(4), key=lambda i: ratios[i]) == 2
    assert min(range(4), key=lambda i: layers[i]["target"]) == 2
    assert layers[2]["target"] == pytest.approx(0.6 - 0.08)
    assert sum(rec["target"] for rec in layers) / 4 == pytest.approx(0.6, abs=1e-12)
    for s in res.stats:  # each linear exact at its layer's sparsity
        w = model.get_submodule(s["name"]).weight
        k = prune_count(layers[s["layer"]]["target"], w.shape[1])
        assert ((w == 0).sum(1) == k).all(), s["name"]
    for rec in layers:
        assert rec["sparsity"] == pytest.approx(rec["target"], abs=1 / 64)
    total = sum(s["shape"][0] * s["shape"][1] for s in res.stats)
    zeros = total - sum(s["nnz"] for s in res.stats)
    assert zeros / total == pytest.approx(0.6, abs=1 / 64)


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("allocation", ["uniform", "owl"])
def test_sparsegpt_prunes_a_tiny_model_end_to_end(arch, allocation):
    model, ids = tiny_model(arch), random_ids()
    dense = copy.deepcopy(model)
    res = pruning.prune(
        model, "sparsegpt", 0.5, calibration=ids, allocation=allocation, progress=False
    )
    assert len(res.stats) == 2 * 7 and res.method == "sparsegpt"
    assert res.statistics_mb > 0
    targets = {rec["layer"]: rec["target"] for rec in res.allocation.get("layers", [])}
    for s in res.stats:
        w = model.get_submodule(s["name"]).weight
        k = prune_count(targets.get(s["layer"], 0.5), w.shape[1])
        assert ((w == 0).sum(1) == k).all(), s["name"]
    # Kept weights moved (OBS updates), unlike a mask-only method.
    w0, w1 = dense.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight
    kept = w1 != 0
    assert not torch.equal(w0[kept], w1[kept])
    assert torch.isfinite(model(random_ids(1, 8)).logits).all()


def test_sparsegpt_beats_wanda_on_the_layer_outputs_of_a_tiny_model():
    """The first decoder layer's output on the calibration tokens, pruned vs dense."""
    ids = random_ids(8, 32)
    dense = tiny_model(intermediate_size=128)
    outs = {}
    for method in ("wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        model.model.layers = model.model.layers[:1]
        pruning.prune(model, method, 0.6, calibration=ids, progress=False)
        with torch.no_grad():
            outs[method] = model.model(ids).last_hidden_state
    ref = copy.deepcopy(dense)
    ref.model.layers = ref.model.layers[:1]
    with torch.no_grad():
        want = ref.model(ids).last_hidden_state
    err = {m: float((o - want).norm()) for m, o in outs.items()}
    assert err["sparsegpt"] < err["wanda"], err


def test_ria_score_is_relative_importance_times_root_norm():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    sq = torch.tensor([16.0, 81.0])  # ||X|| = 4, 9
    row = w.abs() / w.abs().sum(1, keepdim=True)
    col = w.abs() / w.abs().sum(0, keepdim=True)
    want = (row + col) * torch.tensor([2.0, 3.0])
    torch.testing.assert_close(ria_score(w, sq), want)
    model = tiny_model()
    res = pruning.prune(model, "ria", 0.5, calibration=random_ids(), progress=False)
    assert all(math.isclose(s["sparsity"], 0.5) for s in res.stats)


def test_magnitude_with_owl_needs_calibration_and_records_the_allocation(tiny_llama):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        pruning.prune(tiny_llama, "magnitude", 0.5, allocation="owl", progress=False)
    res = pruning.prune(
        tiny_llama,
        "magnitude",
        0.5,
        calibration=random_ids(),
        allocation=OWL(lam=0.05, m=3.0),
        progress=False,
    )
    assert res.to_dict()["allocation"]["m"] == 3.0
    assert len(res.allocation["layers"]) == 2
    with pytest.raises(ValueError, match="unknown allocation 'even'"):
        pruning.prune(tiny_llama, "magnitude", 0.5, allocation="even", progress=False)
