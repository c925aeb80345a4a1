"""Chat on a packed (or any causal) model: ``sparamx.chat(model, tokenizer, messages)``.

The messages (OpenAI / transformers form: ``[{"role": "user", "content": "..."}]``)
become one prompt through the tokenizer's chat template
(``apply_chat_template(..., add_generation_prompt=True)``), and the reply comes from
``sparamx.generate`` with the same options (streaming, sampling, stop strings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

NO_TEMPLATE = (
    "the tokenizer has no chat template (tokenizer.chat_template is unset): set one, or "
    "pass a plain prompt to sparamx.generate"
)


def message_text(content) -> str:
    """A message's content as text: a string, or OpenAI's list of parts
    (``{"type": "text", "text": ...}``; other part types are not supported)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text content parts are supported, got {kind!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"message content must be a string or a list of text parts, got {content!r}")


def _plain_messages(messages) -> list[dict[str, str]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {m!r}")
        if "content" not in m:
            raise ValueError(f"messages[{i}] has no 'content'")
        out.append({"role": m["role"], "content": message_text(m["content"])})
    return out


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """The token ids of ``messages`` in the tokenizer's chat template, ending with the
    assistant's turn opened. The template writes its own special tokens (a BOS among
    them), so the text is tokenized without adding more."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer (its chat template makes the prompt)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(NO_TEMPLATE)
    plain = _plain_messages(messages)
    try:
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001  (jinja's errors: a template's own raise_exception)
        raise ValueError(f"the chat template rejected the messages: {e}") from e
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat(
    model,
    tokenizer,
    messages,
    max_new_tokens: int | None = None,
    *,
    stream: Callable[[str], object] | None = None,
    **options,
):
    """The assistant's reply to ``messages`` (a ``sparamx.Generation``; ``.text`` is the
    reply). ``stream``, ``max_new_tokens`` and every other option are
    ``sparamx.generate``'s (``compile``, ``attention``, ``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``seed``, ``stop``...)."""
    from .generate import generate

    ids = chat_prompt_ids(tokenizer, messages)
    return generate(model, tokenizer, ids, max_new_tokens, stream=stream, **options)
