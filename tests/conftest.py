"""Shared pytest set-up: offline hub settings and small model fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_config(arch: str = "llama", **overrides):
    """A tiny random decoder config of the given family (llama, qwen2, mistral, gemma)."""
    from transformers import AutoConfig

    kw = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=257,
        max_position_embeddings=256,
        head_dim=16,
    )
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


@pytest.fixture
def tiny_llama():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (bf16), converted once from the shipped GGUF."""
    from sparamx.models import load_model

    return load_model("smollm2-135m", dtype="bfloat16")


def tiny_tokenizer():
    """A byte-level tokenizer of 257 tokens (the 256 bytes and an end-of-text token, the
    vocabulary of ``tiny_config``): saves and loads in milliseconds, where a real one
    takes a model load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def magnitude_packed(model):
    """50% magnitude pruning per output row (lm_head kept), then pack, in place."""
    from torch import nn

    import sparamx

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name != "lm_head":
                score = mod.weight.abs().float()
                kth = score.kthvalue(mod.weight.shape[1] // 2, dim=1, keepdim=True).values
                mod.weight[score <= kth] = 0
    sparamx.swap_linears(model)
    return model


def zero_random_weights(root, sparsity: float, skip=()):
    """Zero a random ``sparsity`` fraction of every ``nn.Linear`` weight under ``root``
    (those named in ``skip`` kept), in place: the tests' stand-in for pruning."""
    from torch import nn

    with torch.no_grad():
        for name, mod in root.named_modules():
            if isinstance(mod, nn.Linear) and name not in skip:
                mod.weight[torch.rand(mod.weight.shape) < sparsity] = 0


def masked_linear(n, k, bias=True, sparsity=0.5, seed=0):
    """An ``nn.Linear(k, n)`` with a random ``sparsity`` fraction of its weights zero."""
    from torch import nn

    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight[torch.rand(n, k) < sparsity] = 0
    return lin


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run the test at 1 and at 2 torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)
