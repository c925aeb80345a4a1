"""Sampling in ``sparamx.generate``: each logits step agrees with transformers' own
processor or warper on random logits, seeded sampling gives ``model.generate``'s tokens
under the same seed, defaults come from ``generation_config``, stop strings and stop
token ids end the text, and bad parameters are clear errors."""

import pytest
import torch
from conftest import tiny_config, tiny_tokenizer, zero_random_weights
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import sparamx
from sparamx import sampling
from sparamx.generate import generate
from sparamx.sampling import SamplingParams, StopText

N_NEW = 16


def _logits(seed: int, batch: int, vocab: int, coarse: bool) -> torch.Tensor:
    """Random fp32 logits; ``coarse`` rounds them to halves, so many tie."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=gen) * 4
    return (x * 2).round() / 2 if coarse else x


logit_cases = st.tuples(
    st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(2, 300), st.booleans()
)


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


@settings(max_examples=60, deadline=None)
@given(logit_cases, st.floats(0.05, 5.0))
def test_temperature_agrees_with_transformers(case, t):
    x = _logits(*case)
    _same(sampling.apply_temperature(x, t), TemperatureLogitsWarper(t)(None, x.clone()))


@settings(max_examples=60, deadline=None)
@given(logit_cases, st.integers(1, 400))
def test_top_k_agrees_with_transformers(case, k):
    x = _logits(*case)
    _same(sampling.apply_top_k(x, k), TopKLogitsWarper(k)(None, x.clone()))


@settings(max_examples=80, deadline=None)
@given(logit_cases, st.floats(0.01, 1.0))
def test_top_p_agrees_with_transformers(case, p):
    x = _logits(*case)
    _same(sampling.apply_top_p(x, p), TopPLogitsWarper(p)(None, x.clone()))


@settings(max_examples=80, deadline=None)
@given(logit_cases, st.floats(0.0, 1.0))
def test_min_p_agrees_with_transformers(case, m):
    x = _logits(*case)
    _same(sampling.apply_min_p(x, m), MinPLogitsWarper(m)(None, x.clone()))


@settings(max_examples=60, deadline=None)
@given(logit_cases, st.floats(0.1, 3.0), st.integers(1, 40))
def test_repetition_penalty_agrees_with_transformers(case, penalty, n_seen):
    x = _logits(*case)
    batch, vocab = x.shape
    ids = torch.randint(0, vocab, (batch, n_seen), generator=torch.Generator().manual_seed(7))
    seen = torch.zeros(batch, vocab, dtype=torch.bool).scatter(1, ids, True)
    ours = sampling.apply_repetition_penalty(x, seen, penalty)
    # transformers' processor takes [batch, 1, vocab] scores (its in-place form)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, x.clone()[:, None])[:, 0]
    _same(ours, theirs)


@settings(max_examples=60, deadline=None)
@given(
    logit_cases,
    st.floats(0.2, 2.0),
    st.integers(0, 60),
    st.floats(0.05, 1.0),
    st.one_of(st.none(), st.floats(0.0, 0.5)),
)
def test_the_whole_chain_agrees_with_transformers(case, t, k, p, m):
    """Temperature -> top-k -> top-p -> min-p, as ``model.generate`` orders them."""
    x = _logits(*case)
    params = SamplingParams(do_sample=True, temperature=t, top_k=k, top_p=p, min_p=m)
    chain = [TemperatureLogitsWarper(t)] if t != 1.0 else []
    chain += [TopKLogitsWarper(k)] if k else []
    chain += [TopPLogitsWarper(p)] if p < 1.0 else []
    chain += [MinPLogitsWarper(m)] if m is not None else []
    _same(sampling.process_logits(x, params, None), LogitsProcessorList(chain)(None, x.clone()))


# ------------------------------------------------------------ end to end


def _tiny(seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.bfloat16)
    zero_random_weights(model, 0.5)
    sparamx.swap_linears(model)
    model.generation_config.eos_token_id = None  # run the full length
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _prompt(n=9, seed=1):
    return torch.randint(3, 257, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_sampled(model, ids, seed, **kw) -> list[int]:
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=N_NEW, **kw)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize(
    "kw",
    [
        dict(do_sample=True),  # top_k 50 by default, as in transformers
        dict(do_sample=True, temperature=0.7, top_k=0, top_p=0.9),
        dict(do_sample=True, temperature=1.3, top_k=20, min_p=0.05, repetition_penalty=1.2),
    ],
)
def test_seeded_sampling_gives_model_generate_tokens(tiny, kw):
    """Same logits, same processing, same generator stream: the same tokens."""
    ids = _prompt()
    ours = generate(tiny, None, ids, N_NEW, compile=False, seed=1234, **kw)
    assert ours.ids == _hf_sampled(tiny, ids, 1234, **kw)


def test_seeded_sampling_is_reproducible(tiny):
    ids = _prompt()
    runs = [
        generate(tiny, None, ids, N_NEW, compile=False, do_sample=True, seed=s).ids
        for s in (5, 5, 6)
    ]
    assert runs[0] == runs[1] != runs[2]


def test_greedy_with_repetition_penalty_gives_model_generate_tokens(tiny):
    ids = _prompt(seed=3)
    ours = generate(tiny, None, ids, N_NEW, compile=False, repetition_penalty=1.5).ids
    assert ours == _hf_sampled(tiny, ids, 0, do_sample=False, repetition_penalty=1.5)
    assert ours != generate(tiny, None, ids, N_NEW, compile=False).ids


def test_defaults_come_from_generation_config():
    model = _tiny(seed=2)
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.max_new_tokens = True, 0.8, 10, 7
    ids = _prompt()
    ours = generate(model, None, ids, compile=False, seed=99)
    torch.manual_seed(99)
    with torch.inference_mode():
        theirs = model.generate(ids)[0, ids.shape[1] :].tolist()
    assert len(ours.ids) == 7 and ours.ids == theirs
    # the caller's value wins over the generation config's
    greedy = generate(model, None, ids, 7, compile=False, do_sample=False)
    gc.do_sample = False
    assert greedy.ids == generate(model, None, ids, 7, compile=False).ids


def test_resolve_keeps_greedy_when_nothing_asks_for_sampling(tiny):
    p = SamplingParams.resolve(tiny.generation_config)
    assert p.greedy_argmax and p.top_k == 50 and p.temperature == 1.0 and p.stop == ()
    assert SamplingParams.resolve(None, stop="x").stop == ("x",)


def test_compiled_sampling_matches_eager(tiny):
    ids = _prompt(seed=4)
    kw = dict(do_sample=True, temperature=0.9, top_p=0.95, seed=3)
    eager = generate(tiny, None, ids, N_NEW, compile=False, **kw)
    compiled = generate(tiny, None, ids, N_NEW, compile=True, **kw)
    assert compiled.backend == "inductor" and compiled.ids == eager.ids
    assert ("inductor", "exact", "logits") in sparamx.generate._STATES[tiny].steps


# ------------------------------------------------------------ stops


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _greedy_text(model, tok, prompt, n=N_NEW):
    return generate(model, tok, prompt, n, compile=False, stop_at_eos=False)


def test_stop_string_ends_the_text_before_it(tiny, tok):
    free = _greedy_text(tiny, tok, "hello")
    text = free.text
    stop = text[5:7]
    first = text.find(stop)
    pieces = []
    res = generate(
        tiny, tok, "hello", N_NEW, compile=False, stop=[stop, "\x00never"], stream=pieces.append
    )
    assert res.stop_reason == "stop"
    assert res.text == text[:first] == "".join(pieces)
    assert len(res.ids) < len(free.ids) and res.ids == free.ids[: len(res.ids)]


def test_stream_holds_back_a_possible_stop_string_then_releases_it(tok):
    ids = tok("abcabd", add_special_tokens=False)["input_ids"]
    pieces = []
    st_ = StopText(tok, ["abd!"], pieces.append)
    assert not any(st_.put(i) for i in ids)
    assert "".join(pieces) == "abc"  # "abd" may still become "abd!"
    st_.finish()
    assert "".join(pieces) == "abcabd"


def test_stop_token_ids_end_the_generation(tiny):
    ids = _prompt()
    free = generate(tiny, None, ids, N_NEW, compile=False).ids
    res = generate(tiny, None, ids, N_NEW, compile=False, stop_token_ids=[free[3]])
    assert res.stop_reason == "stop" and res.ids == free[: free.index(free[3]) + 1]


def test_should_stop_cancels(tiny):
    calls = []
    res = generate(
        tiny,
        None,
        _prompt(),
        N_NEW,
        compile=False,
        should_stop=lambda: len(calls.append(0) or calls) >= 4,
    )
    assert res.stop_reason == "cancelled" and len(res.ids) == 4


@pytest.mark.parametrize(
    "kw, exc, msg",
    [
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature must be a number > 0"),
        (dict(top_p=1.5), ValueError, r"top_p must be a number in \(0, 1\]"),
        (dict(top_k=-1), ValueError, "top_k must be an int >= 0"),
        (dict(min_p=2), ValueError, r"min_p must be a number in \[0, 1\]"),
        (dict(repetition_penalty=0), ValueError, "repetition_penalty must be a number > 0"),
        (dict(seed="x"), TypeError, "seed must be an int"),
        (dict(stop=[""]), ValueError, "stop strings must not be empty"),
        (dict(stop=[3]), TypeError, "stop must be a string or a list of strings"),
        (dict(stop_token_ids=[-1]), TypeError, "stop_token_ids must be a list"),
        (dict(topk=3), TypeError, "unknown sampling parameter"),
        (dict(stop="x"), ValueError, "need a tokenizer"),
    ],
)
def test_bad_sampling_parameters(tiny, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        generate(tiny, None, _prompt(), 4, compile=False, **kw)
