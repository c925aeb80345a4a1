"""The lean decode path (``sparamx.generate``): greedy tokens equal ``model.generate``'s
(tiny random packed and plain models; the real SmolLM2, dense and 50% packed), the
cache and compiled step are reused across calls, streaming, and clear errors.

The compiled step is tested on the tiny model only: compiling SmolLM2's 30 layers took
45-120 s on this loaded 2-core machine with a cold inductor cache (11-14 s warm), so the
SmolLM2 tests run the same path with ``compile=False``."""

import importlib

import pytest
import torch
from conftest import magnitude_packed, tiny_config, zero_random_weights

import sparamx
from sparamx.generate import generate

# the module itself (sparamx.generate may resolve to the function)
lean = importlib.import_module("sparamx.generate")

N_NEW = 24


def _tiny(arch="llama", sparsity=0.5, packed=True, seed=0, exclude=None, **cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **cfg), dtype=torch.bfloat16)
    if packed:
        zero_random_weights(model, sparsity)
        sparamx.swap_linears(model, exclude=exclude)
    return model.eval()


def _prompt(n=9, seed=1):
    return torch.randint(3, 257, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_new_tokens(model, ids, n) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def tiny_packed():
    return _tiny()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sparamx.models import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("smollm2-135m")[0])


# ------------------------------------------------------------- same tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_eager_lean_tokens_equal_hf_generate_on_tiny_packed(arch):
    model = _tiny(arch)
    ids = _prompt()
    res = generate(model, None, ids, N_NEW, compile=False)
    assert res.ids == _hf_new_tokens(model, ids, N_NEW)
    assert res.prompt_tokens == 9 and res.backend is None and res.compile_s == 0.0


def test_lean_tokens_equal_hf_generate_with_packed_tied_head():
    """A tied lm_head packed (dense layout), its weight shared with the input embedding."""
    from sparamx.layers import PackedEmbedding

    model = _tiny(sparsity=0.0, exclude=[], tie_word_embeddings=True)
    assert isinstance(model.model.embed_tokens, PackedEmbedding)
    ids = _prompt(seed=9)
    assert generate(model, None, ids, N_NEW, compile=False).ids == _hf_new_tokens(model, ids, N_NEW)


def test_eager_lean_tokens_equal_hf_generate_on_tiny_plain_model():
    model = _tiny(packed=False)
    ids = _prompt(seed=2)
    assert generate(model, None, ids, N_NEW, compile=False).ids == _hf_new_tokens(model, ids, N_NEW)


def test_compiled_lean_tokens_equal_hf_generate_on_tiny_packed(tiny_packed):
    for seed, n in [(1, 9), (3, 17), (4, 1)]:
        ids = _prompt(n, seed)
        res = generate(tiny_packed, None, ids, N_NEW, compile=True)
        assert res.backend == "inductor"
        assert res.ids == _hf_new_tokens(tiny_packed, ids, N_NEW), (seed, n)
        assert len(res.token_times_s) == len(res.ids) - 1
        assert res.ttft_s > 0 and all(t > 0 for t in res.token_times_s)


def test_decode_step_traces_as_one_graph_with_our_ops(tiny_packed):
    """What fullgraph=True requires: no graph break; the linears stay sparamx ops."""
    from transformers import StaticCache

    cache = StaticCache(config=tiny_packed.config, max_cache_len=64)
    kv = torch.arange(10)
    torch._dynamo.mark_dynamic(kv, 0, min=2, max=63)
    with torch.inference_mode(), lean._lean_attention(tiny_packed):
        token = lean.prefill(tiny_packed, _prompt(), cache)
        explained = torch._dynamo.explain(lean.decode_one_token)(
            tiny_packed, token, torch.tensor([[9]]), cache, kv
        )
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    code = explained.graphs[0].code
    assert code.count("sparamx.sparse_linear") == 14  # 2 layers x 7 linears


def test_fast_attention_is_our_kernel_in_the_graph(tiny_packed):
    from transformers import StaticCache

    cache = StaticCache(config=tiny_packed.config, max_cache_len=64)
    kv = torch.arange(10)
    torch._dynamo.mark_dynamic(kv, 0, min=2, max=63)
    with torch.inference_mode(), lean._lean_attention(tiny_packed, "fast"):
        token = lean.prefill(tiny_packed, _prompt(), cache)
        explained = torch._dynamo.explain(lean.decode_one_token)(
            tiny_packed, token, torch.tensor([[9]]), cache, kv
        )
    assert explained.graph_break_count == 0
    code = explained.graphs[0].code
    assert code.count("sparamx.kv_decode_attention") == 2  # one per layer
    assert "scaled_dot_product_attention" not in code


@pytest.mark.parametrize("length", [1, 2, 17, 33, 100])
def test_fast_attention_close_to_sdpa(length):
    """Same attention as the exact path up to bf16 rounding of the output."""

    class Module:  # what transformers' SDPA call reads from the attention module
        num_key_value_groups, is_causal, training = 3, True, False

    gen = torch.Generator().manual_seed(length)
    q = torch.randn(1, 9, 1, 64, generator=gen).bfloat16()
    k, v = (torch.randn(1, 3, 128, 64, generator=gen).bfloat16() for _ in range(2))
    pos = torch.arange(length)
    exact, _ = lean.lean_sdpa_attention(Module(), q, k, v, None, scaling=0.125, kv_positions=pos)
    fast, _ = lean.lean_fast_attention(Module(), q, k, v, None, scaling=0.125, kv_positions=pos)
    assert fast.shape == exact.shape == (1, 1, 9, 64)
    torch.testing.assert_close(fast.float(), exact.float(), atol=1 / 32, rtol=1 / 64)


def test_fast_attention_generates_compiled(tiny_packed):
    ids = _prompt()
    res = generate(tiny_packed, None, ids, N_NEW, compile=True, attention="fast")
    assert len(res.ids) == N_NEW and res.backend == "inductor"
    state = lean._STATES[tiny_packed]
    assert ("inductor", "fast") in state.steps  # its own step, apart from the exact one
    # the first token comes from the (shared, exact) prefill
    assert res.ids[0] == _hf_new_tokens(tiny_packed, ids, 1)[0]


def test_only_exact_attention_makes_the_norms_opaque(tiny_packed):
    generate(tiny_packed, None, _prompt(), 2, compile=True, attention="fast")
    state = lean._STATES[tiny_packed]
    patched = lambda: [m for m in tiny_packed.modules() if "forward" in vars(m)]  # noqa: E731
    with lean._step_context(tiny_packed, state, "inductor", "fast"):
        assert not patched()  # fast: inductor fuses the norms
    with lean._step_context(tiny_packed, state, "inductor", "exact"):
        assert patched()  # exact: eager floats through sparamx::rms_norm / eager_norm
    assert not patched()


def test_stops_at_eos_like_hf_generate(tiny_packed):
    ids = _prompt()
    free = _hf_new_tokens(tiny_packed, ids, N_NEW)
    eos = free[5]
    old = tiny_packed.generation_config.eos_token_id
    tiny_packed.generation_config.eos_token_id = eos
    try:
        res = generate(tiny_packed, None, ids, N_NEW, compile=False)
        ref = _hf_new_tokens(tiny_packed, ids, N_NEW)
    finally:
        tiny_packed.generation_config.eos_token_id = old
    assert res.ids == ref and res.ids[-1] == eos and res.stop_reason == "eos"
    assert len(res.ids) == free.index(eos) + 1


def test_model_left_as_it_was(tiny_packed):
    before = tiny_packed.config._attn_implementation
    generate(tiny_packed, None, _prompt(), 3, compile=True)
    assert tiny_packed.config._attn_implementation == before == "sdpa"
    assert not any("forward" in vars(m) for m in tiny_packed.modules())  # norms restored


# ------------------------------------------------------------- cache reuse


def test_cache_and_compiled_step_reused_across_calls(tiny_packed):
    from torch._dynamo.utils import counters

    generate(tiny_packed, None, _prompt(), N_NEW, compile=True)  # compiled (or not) before
    state = lean._STATES[tiny_packed]
    keys = state.cache.layers[0].keys
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the counter does count compiled graphs
    for seed, n in [(5, 12), (6, 30)]:
        res = generate(tiny_packed, None, _prompt(n, seed), N_NEW, compile=True)
        assert res.cache_reused and res.compile_s == 0.0
        assert res.cache_len == state.cache_len == 256
    assert lean._STATES[tiny_packed] is state
    assert state.cache.layers[0].keys is keys  # not reallocated
    assert counters["stats"]["unique_graphs"] == graphs  # not recompiled


def test_cache_grows_for_a_longer_request_and_is_kept():
    model = _tiny(seed=7, max_position_embeddings=1024)
    first = generate(model, None, _prompt(), 8, compile=False)
    assert first.cache_len == 256 and not first.cache_reused
    ids = _prompt(200, 8)
    longer = generate(model, None, ids, 60, compile=False)
    assert longer.cache_len == 512 and not longer.cache_reused
    assert longer.ids == _hf_new_tokens(model, ids, 60)
    again = generate(model, None, _prompt(), 8, compile=False)  # smaller: keeps 512
    assert again.cache_len == 512 and again.cache_reused and again.ids == first.ids
    lean.release(model)
    assert model not in lean._STATES


# ---------------------------------------------------------------- streaming


def test_stream_pieces_join_to_the_text(tiny_packed, tokenizer):
    pieces = []
    res = generate(tiny_packed, tokenizer, _prompt(), N_NEW, stream=pieces.append, compile=False)
    assert len(pieces) > 1
    assert "".join(pieces) == tokenizer.decode(res.ids, skip_special_tokens=True)
    assert res.text == tokenizer.decode(res.ids)


def test_sparamx_generate_is_callable(tiny_packed):
    """``sparamx.generate`` works whether it resolves to the function or the module."""
    for fn in (sparamx.generate, lean):
        assert len(fn(tiny_packed, None, [5, 6, 7], 3, compile=False).ids) == 3


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad, exc, msg",
    [
        (0, ValueError, "max_new_tokens must be >= 1, got 0"),
        (-3, ValueError, "got -3"),
        (2.5, TypeError, "max_new_tokens must be an int, got float 2.5"),
        (True, TypeError, "got bool"),
        ("8", TypeError, "got str"),
    ],
)
def test_bad_max_new_tokens(tiny_packed, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        generate(tiny_packed, None, _prompt(), bad)


def test_prompt_longer_than_the_cache(tiny_packed):
    with pytest.raises(ValueError, match=r"prompt is too long: 9 tokens.*max_cache_len=8.* 8"):
        generate(tiny_packed, None, _prompt(9), 4, max_cache_len=8)


def test_prompt_plus_new_tokens_longer_than_the_cache(tiny_packed):
    with pytest.raises(
        ValueError,
        match=r"prompt \(9 tokens\) \+ max_new_tokens \(40\) = 49 .* holds 32; "
        r"ask for at most 23",
    ):
        generate(tiny_packed, None, _prompt(9), 40, max_cache_len=32)


def test_prompt_longer_than_the_model_context(tiny_packed):
    # tiny_config: max_position_embeddings=256
    with pytest.raises(ValueError, match=r"300 tokens.*max_position_embeddings=256"):
        generate(tiny_packed, None, _prompt(300), 4)


def test_bad_attention_mode(tiny_packed):
    with pytest.raises(ValueError, match=r"attention must be one of \['exact', 'fast'\]"):
        generate(tiny_packed, None, _prompt(), 4, attention="flash")


def test_other_bad_inputs(tiny_packed):
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_packed, None, [], 4)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate(tiny_packed, None, "text", 4)
    with pytest.raises(ValueError, match="one prompt at a time"):
        generate(tiny_packed, None, torch.zeros((2, 3), dtype=torch.long), 4)
    with pytest.raises(TypeError, match="max_cache_len must be an int"):
        generate(tiny_packed, None, _prompt(), 4, max_cache_len=64.0)


# ------------------------------------------------------------------ SmolLM2

PROMPTS = [
    "The history of the printing press begins",
    "Explain why the sky is blue in one paragraph.",
]


@pytest.fixture(scope="module")
def smollm2_packed():
    from sparamx.models import load_model

    model, tok = load_model("smollm2-135m", dtype="bfloat16")
    return magnitude_packed(model), tok


@pytest.mark.slow
def test_lean_tokens_equal_hf_generate_on_smollm2_dense(smollm2):
    model, tok = smollm2
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        res = generate(model, tok, p, 48, compile=False)
        assert res.ids == _hf_new_tokens(model, ids, 48), p


@pytest.mark.slow
def test_lean_tokens_equal_hf_generate_on_smollm2_packed(smollm2_packed):
    model, tok = smollm2_packed
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        res = generate(model, tok, p, 48, compile=False)
        assert res.ids == _hf_new_tokens(model, ids, 48), p
        assert res.text == tok.decode(res.ids)


# ------------------------------------------------------------- sparse KV cache

# Small windows so that both the prompt and the decoded tokens get compressed:
# 4 sinks + 8 recent tokens dense, blocks of 16 leave the window.
KV_WINDOWS = {"recent_window": 8, "sink_tokens": 4, "block_tokens": 16}
KV_PROMPT, KV_NEW = 50, 60


def _kv(method="magnitude", ks=0.5, vs=0.5, **kw):
    from sparamx.kv import KVSettings

    return KVSettings(method, ks, vs, **{**KV_WINDOWS, **kw})


def _hf_sparse(model, ids, n, settings):
    """Greedy tokens and the cache of ``model.generate`` with ``kv.SparseKVCache``."""
    from sparamx import kv

    kv.enable_sparse_kv(model, settings)
    cache = kv.new_cache(model)
    try:
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache=cache
            )
    finally:
        kv.disable_sparse_kv(model)
    return out[0, ids.shape[1] :].tolist(), cache


@pytest.mark.parametrize(
    "arch, settings",
    [
        ("llama", {}),
        ("llama", {"mask_tokens": 1}),
        ("llama", {"method": "wanda"}),
        ("llama", {"k_fill": "zero", "vs": 0.25}),
        ("qwen2", {"method": "wanda", "mask_tokens": 1}),
        ("gemma", {}),
    ],
)
def test_sparse_kv_lean_tokens_equal_hf_generate_with_the_sparse_cache(arch, settings):
    """Same pruning code, compaction schedule and kernel inputs as ``SparseKVCache``
    under ``model.generate``: the same greedy tokens and cache bytes."""
    model = _tiny(arch, seed=3)
    ids = _prompt(KV_PROMPT, seed=5)
    s = _kv(**settings)
    res = generate(model, None, ids, KV_NEW, compile=False, kv=s, stop_at_eos=False)
    ref, cache = _hf_sparse(model, ids, KV_NEW, s)
    assert res.ids == ref
    assert res.kv == s.to_dict()
    assert (res.kv_bytes, res.kv_dense_bytes) == (cache.nbytes(), cache.dense_nbytes())
    assert res.kv_bytes < res.kv_dense_bytes
    sparse = lean._STATES[model].sparse[s]
    assert sparse.layers[0].n_comp == cache.layers[0].n_comp > 0


def test_sparse_kv_compiled_tokens_equal_hf_generate_without_recompiling(tiny_packed):
    from torch._dynamo.utils import counters

    s = _kv()
    ids = _prompt(KV_PROMPT, seed=6)
    first = generate(tiny_packed, None, ids, KV_NEW, compile=True, kv=s, stop_at_eos=False)
    assert first.backend == "inductor" and first.compile_s > 0
    graphs = counters["stats"]["unique_graphs"]
    # another prompt length: blocks leave the window at other steps; one graph serves all
    ids2 = _prompt(KV_PROMPT + 23, seed=7)
    second = generate(tiny_packed, None, ids2, KV_NEW, compile=True, kv=s, stop_at_eos=False)
    assert second.cache_reused and second.compile_s == 0.0
    assert counters["stats"]["unique_graphs"] == graphs
    assert first.ids == _hf_sparse(tiny_packed, ids, KV_NEW, s)[0]
    assert second.ids == _hf_sparse(tiny_packed, ids2, KV_NEW, s)[0]


def test_sparse_kv_decode_step_is_one_graph_with_the_kernel(tiny_packed):
    from sparamx.kv_static import StaticSparseKVCache

    cache = StaticSparseKVCache(_kv(), tiny_packed.config, 256)
    with torch.inference_mode(), lean._lean_attention(tiny_packed, sparse=True):
        token = lean.prefill(tiny_packed, _prompt(40), cache)
        cache.begin_decode()
        pos, win = cache.step_inputs(dynamic=True)
        explained = torch._dynamo.explain(lean.decode_one_token)(
            tiny_packed, token, torch.tensor([[40]]), cache, pos, win
        )
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    code = explained.graphs[0].code
    assert code.count("sparamx.kv_decode_attention") == 2  # one per layer
    assert "scaled_dot_product_attention" not in code


@pytest.mark.parametrize("s", [{"method": "none"}, {"ks": 0.0, "vs": 0.0}])
def test_kv_that_prunes_nothing_is_the_dense_loop_bitwise(tiny_packed, s):
    ids = _prompt(KV_PROMPT, seed=8)
    dense = generate(tiny_packed, None, ids, KV_NEW, compile=False, stop_at_eos=False)
    res = generate(tiny_packed, None, ids, KV_NEW, compile=False, kv=_kv(**s), stop_at_eos=False)
    assert res.ids == dense.ids and res.kv is None and res.kv_bytes == dense.kv_bytes


def test_sparse_kv_on_an_fp32_model_equals_hf_generate():
    model = _tiny(packed=False, seed=4).float()
    ids = _prompt(KV_PROMPT, seed=9)
    s = _kv()
    res = generate(model, None, ids, 30, compile=False, kv=s, stop_at_eos=False)
    assert res.ids == _hf_sparse(model, ids, 30, s)[0]


def test_generate_uses_the_models_kv_settings_unless_told_otherwise():
    from sparamx import kv

    model = _tiny(seed=5)
    s = _kv()
    kv.enable_sparse_kv(model, s)  # what sparamx.load does for an artifact that records kv
    ids = _prompt(KV_PROMPT, seed=10)
    res = generate(model, None, ids, 20, compile=False, stop_at_eos=False)
    assert res.kv == s.to_dict()
    dense = generate(model, None, ids, 20, compile=False, stop_at_eos=False, kv=False)
    assert dense.kv is None and dense.kv_bytes == dense.kv_dense_bytes
    assert model.config._attn_implementation == kv.ATTENTION_NAME  # left as it was


def test_sparse_kv_bad_settings_and_models():
    from transformers import AutoModelForCausalLM

    model = _tiny(seed=6)
    with pytest.raises(ValueError, match="kv.k_sparsity"):
        generate(model, None, _prompt(), 4, compile=False, kv={"k_sparsity": 1.0})
    with pytest.raises(ValueError, match="unknown field"):
        generate(model, None, _prompt(), 4, compile=False, kv={"sparsity": 0.5})
    with pytest.raises(TypeError, match="kv must be"):
        generate(model, None, _prompt(), 4, compile=False, kv="magnitude")
    big = AutoModelForCausalLM.from_config(
        tiny_config("llama", hidden_size=1024, num_attention_heads=2, head_dim=512)
    )
    with pytest.raises(ValueError, match="head_dim 512"):
        generate(big, None, _prompt(), 4, compile=False, kv=_kv())
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="needs a model on sdpa attention"):
        generate(model, None, _prompt(), 4, compile=False, kv=_kv())


def test_fast_attention_on_an_fp32_model_reads_a_bf16_copy_of_the_cache():
    model = _tiny(packed=False, seed=4).float()
    ids = _prompt(20, seed=3)
    res = generate(model, None, ids, 12, compile=False, attention="fast", stop_at_eos=False)
    assert len(res.ids) == 12 and res.ids[0] == _hf_new_tokens(model, ids, 1)[0]
