"""Batched decoding with continuous batching (``sparamx.batch``): each row's tokens and
logits match the sequence decoded on its own, while sequences join and leave (rows
move), eager and compiled, plain and packed models; sampling, stops, streaming,
cancellation; clear errors."""

import pytest
import torch
from conftest import magnitude_packed, tiny_config, tiny_tokenizer, zero_random_weights

import sparamx
from sparamx import batch as batch_mod
from sparamx.batch import BatchDecoder, generate_batch

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [3, 3, 3, 3], [40, 41, 42, 43, 44]]


def _tiny(arch="llama", dtype=torch.float32, sparsity=None, **cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, **cfg), dtype=dtype, attn_implementation="sdpa"
    )
    if sparsity is not None:
        zero_random_weights(model, sparsity)
        sparamx.swap_linears(model)
    return model.eval()


def _greedy_alone(model, prompt, n) -> list[int]:
    """The reference: full forward passes without any cache, one token at a time."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def _recording(monkeypatch):
    """Record the logits every sequence chooses from: {id(seq): [logits [vocab]]}."""
    seen: dict[int, list[torch.Tensor]] = {}
    choose = batch_mod.BatchSequence.choose

    def spy(self, logits):
        seen.setdefault(id(self), []).append(logits[0].float().clone())
        return choose(self, logits)

    monkeypatch.setattr(batch_mod.BatchSequence, "choose", spy)
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_rows_decode_as_each_sequence_alone(arch):
    # 5 prompts through 3 slots: sequences join as others leave, rows move down
    model = _tiny(arch)
    out = generate_batch(model, None, PROMPTS, 10, slots=3, compile=False, stop_at_eos=False)
    for prompt, gen in zip(PROMPTS, out, strict=True):
        assert gen.ids == _greedy_alone(model, prompt, 10), prompt
        assert gen.stop_reason == "length" and gen.prompt_tokens == len(prompt)
        assert len(gen.token_times_s) == 9


def test_logits_match_a_full_forward_with_unequal_lengths(monkeypatch):
    model = _tiny()
    seen = _recording(monkeypatch)
    dec = BatchDecoder(model, slots=4, max_len=64, compile=False)
    seqs = [dec.add(p, 8, stop_at_eos=False) for p in PROMPTS[:3]]
    for _ in range(3):
        dec.step()
    seqs.append(dec.add(PROMPTS[3], 8, stop_at_eos=False))  # joins mid-way
    dec.run()
    for prompt, seq in zip(PROMPTS[:4], seqs, strict=True):
        full = torch.tensor([prompt + seq.ids[:-1]])
        with torch.inference_mode():
            ref = model(full).logits[0, len(prompt) - 1 :].float()
        got = torch.stack(seen[id(seq)])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_packed_bf16_rows_follow_the_full_forward(monkeypatch):
    model = _tiny(dtype=torch.bfloat16, sparsity=0.5)
    seen = _recording(monkeypatch)
    dec = BatchDecoder(model, slots=5, max_len=64, compile=False)
    seqs = [dec.add(p, 12, stop_at_eos=False) for p in PROMPTS]
    dec.run()
    agree = total = 0
    for prompt, seq in zip(PROMPTS, seqs, strict=True):
        with torch.inference_mode():
            ref = model(torch.tensor([prompt + seq.ids[:-1]])).logits[0, len(prompt) - 1 :]
        got = torch.stack(seen[id(seq)])
        scale = ref.float().abs().max()
        assert (got - ref.float()).abs().max() <= 0.05 * scale
        agree += int((ref.argmax(-1) == torch.tensor(seq.ids)).sum())
        total += len(seq.ids)
    assert agree / total >= 0.9


def test_compiled_steps_equal_eager_and_do_not_recompile_per_length():
    model = _tiny(dtype=torch.bfloat16, sparsity=0.5)
    eager = generate_batch(model, None, PROMPTS, 12, slots=3, compile=False, stop_at_eos=False)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = generate_batch(model, None, PROMPTS, 12, slots=3, stop_at_eos=False)
    for e, c in zip(eager, compiled, strict=True):
        assert e.ids == c.ids
    # batch sizes 1 and >= 2 (one graph each); lengths are symbolic
    assert counters["stats"]["unique_graphs"] <= 3


def test_caller_inference_mode_does_not_recompile():
    # the demo steps the decoder from inside transformers' generate (inference mode)
    from torch._dynamo.utils import counters

    model = _tiny(dtype=torch.bfloat16, sparsity=0.5)
    dec = BatchDecoder(model, slots=1, max_len=64, compile="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    dec.add(PROMPTS[1], 12, stop_at_eos=False)
    dec.step()
    dec.step()
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        dec.step()
    dec.step()
    with torch.no_grad():
        dec.step()
    assert counters["stats"]["unique_graphs"] == graphs


def test_stops_sampling_and_streaming():
    model, tok = _tiny(), tiny_tokenizer()
    pieces: list[str] = []
    dec = BatchDecoder(model, tok, slots=2, max_len=128, compile=False)
    streamed = dec.add("hello", 20, stream=pieces.append, stop_at_eos=False)
    ref = _greedy_alone(model, tok("hello")["input_ids"], 20)
    text = tok.decode(ref, skip_special_tokens=True)
    stop = text[5:8]
    stopped = dec.add("hello", 20, stop=stop, stop_at_eos=False)
    dec.run()
    assert streamed.result.ids == ref and "".join(pieces) == text
    assert stopped.result.stop_reason == "stop" and stop not in stopped.result.text
    assert stopped.result.text == text[: text.index(stop)]
    # seeded sampling is reproducible, and differs from greedy
    a = generate_batch(model, None, PROMPTS[:2], 16, compile=False, do_sample=True, seed=3)
    b = generate_batch(model, None, PROMPTS[:2], 16, compile=False, do_sample=True, seed=3)
    assert [g.ids for g in a] == [g.ids for g in b]


def test_eos_and_cancel_free_their_rows():
    model = _tiny()
    first = _greedy_alone(model, PROMPTS[0], 3)
    model.generation_config.eos_token_id = first[2]
    dec = BatchDecoder(model, slots=2, max_len=64, compile=False)
    a = dec.add(PROMPTS[0], 20)
    b = dec.add(PROMPTS[1], 20, stop_at_eos=False)
    dec.step()
    done = dec.step()
    assert done == [a] and a.result.stop_reason == "eos" and a.result.ids == first
    assert dec.active == 1 and dec.free == 1
    dec.cancel(b)
    assert b.result.stop_reason == "cancelled" and dec.active == 0
    c = dec.add(PROMPTS[2], 5, stop_at_eos=False)
    stopped = dec.step(should_stop=lambda seq: True)
    assert stopped == [c] and c.result.stop_reason == "cancelled"


def test_bad_inputs():
    model = _tiny()
    with pytest.raises(ValueError, match="slots must be >= 1"):
        BatchDecoder(model, slots=0)
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        BatchDecoder(model, max_len=1000)
    with pytest.raises(ValueError, match="compile must be"):
        BatchDecoder(model, compile="tvm")
    dec = BatchDecoder(model, slots=1, max_len=16, compile=False)
    with pytest.raises(ValueError, match=r"do not fit the batch cache \(max_len=16\)"):
        dec.add(list(range(10)), 10)
    with pytest.raises(ValueError, match="prompt is empty"):
        dec.add([], 3)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        dec.add("text", 3)
    with pytest.raises(ValueError, match="need a tokenizer"):
        dec.add([1, 2], 3, stop=["x"])
    dec.add([1, 2], 5)
    with pytest.raises(RuntimeError, match="all 1 slots are in use"):
        dec.add([1, 2], 5)
    with pytest.raises(TypeError, match="sequence of prompts"):
        generate_batch(model, None, "one prompt", 3)
    done = dec.step()  # the decoder still works after the errors
    assert dec.active == 1 and done == []
    eager = _tiny()
    eager.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="needs a model on sdpa attention"):
        BatchDecoder(eager)
    sliding = _tiny("gemma3_text", layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match="sliding-window"):
        BatchDecoder(sliding)


@pytest.mark.slow
def test_smollm2_packed_rows_follow_the_full_forward():
    from sparamx.models import load_model

    model, tok = load_model("smollm2-135m", dtype="bfloat16")
    model = magnitude_packed(model)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    dec = BatchDecoder(model, tok, slots=3, max_len=256, compile=False)
    seqs = [dec.add(p, 24, stop_at_eos=False) for p in prompts]
    dec.run()
    agree = total = 0
    for p, seq in zip(prompts, seqs, strict=True):
        ids = tok(p)["input_ids"]
        with torch.inference_mode():
            ref = model(torch.tensor([ids + seq.ids[:-1]])).logits[0, len(ids) - 1 :]
        agree += int((ref.argmax(-1) == torch.tensor(seq.ids)).sum())
        total += len(seq.ids)
    assert agree / total >= 0.95
