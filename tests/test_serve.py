"""The OpenAI-compatible server (``sparamx.serve``) and ``sparamx.chat``, driven with the
real ``openai`` client on loopback: chat, completion, streaming, stop strings, seeded
sampling, concurrent requests, every kind of bad request (4xx, never 500), a full
queue (429), a client that disconnects, and the ``python -m sparamx.serve`` command.

The server runs in-process on a random free port (uvicorn on a thread) over a tiny
random packed artifact whose byte-level tokenizer has a small chat template; the
decode step is eager (``compile=False``), so each test takes well under a second."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_config, tiny_tokenizer, zero_random_weights

import sparamx
from sparamx.serve.app import Server, ServerThread, create_app
from sparamx.serve.engine import Engine, Job

openai = pytest.importorskip("openai")

NAME = "tiny"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny random Llama, 50% pruned and packed, saved with a chat-template tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.bfloat16).eval()
    zero_random_weights(model, 0.5)
    sparamx.swap_linears(model)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("serve") / "artifact"
    sparamx.save(model, tok, path)
    return path


@pytest.fixture(scope="module")
def loaded(artifact):
    model, tok = sparamx.load(artifact)
    model.generation_config.eos_token_id = None  # random weights: always run to length
    return model, tok


@pytest.fixture(scope="module", params=[8, 1], ids=["batched", "one-at-a-time"])
def served(loaded, request):
    """(server, engine, base url) for the whole module: requests decoded together
    (continuous batching, 8 slots) or one at a time (``sparamx.generate``)."""
    model, tok = loaded
    engine = Engine(model, tok, context=256, max_queue=8, compile=False, slots=request.param)
    engine.start(warm_up=False)
    server = Server(engine, NAME, default_max_tokens=16)
    with ServerThread(create_app(server)) as st:
        yield server, engine, f"http://127.0.0.1:{st.port}"
    engine.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[2] + "/v1", api_key="none", max_retries=0, timeout=30)


def _post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.waiting or engine.stats.running:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


# ------------------------------------------------------------------ chat()


def test_chat_is_generate_on_the_templated_prompt(loaded):
    model, tok = loaded
    out = sparamx.chat(model, tok, HELLO, 8, compile=False)
    text = "<|user|>Hello there\n<|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert out.prompt_tokens == len(ids)
    assert out.ids == sparamx.generate(model, tok, ids, 8, compile=False).ids


def test_chat_streams_and_takes_content_parts(loaded):
    model, tok = loaded
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
        }
    ]
    pieces = []
    out = sparamx.chat(model, tok, parts, 8, compile=False, stream=pieces.append)
    assert out.ids == sparamx.chat(model, tok, HELLO, 8, compile=False).ids
    assert "".join(pieces) == tok.decode(out.ids, skip_special_tokens=True)


def test_chat_without_a_template_is_a_clear_error(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        sparamx.chat(model, tiny_tokenizer(), HELLO, 4, compile=False)


@pytest.mark.parametrize(
    "messages, msg",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"content": "x"}], r"messages\[0\] must be a dict with a string 'role'"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text content parts"),
    ],
)
def test_chat_bad_messages(loaded, messages, msg):
    model, tok = loaded
    with pytest.raises(ValueError, match=msg):
        sparamx.chat(model, tok, messages, 4, compile=False)


# ------------------------------------------------------------------ basics


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    status, body = _get(served[2] + "/health")
    assert status == 200 and body["status"] == "ok" and body["context"] == 256


def test_chat_completion_is_sparamx_chat(served, client, loaded):
    r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=12)
    model, tok = loaded
    _idle(served[1])
    ref = sparamx.chat(model, tok, HELLO, 12, compile=False)
    assert r.object == "chat.completion" and r.model == NAME
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == tok.decode(ref.ids, skip_special_tokens=True)
    assert r.usage.prompt_tokens == ref.prompt_tokens
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == ref.prompt_tokens + 12


def test_completion_text_and_usage(served, client, loaded):
    model, tok = loaded
    r = client.completions.create(model=NAME, prompt="Once upon", max_tokens=10)
    _idle(served[1])
    ref = sparamx.generate(model, tok, "Once upon", 10, compile=False)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == tok.decode(ref.ids, skip_special_tokens=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, 10)


def test_completion_from_token_ids_and_default_max_tokens(client):
    r = client.completions.create(model=NAME, prompt=[72, 101, 108])
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 16  # the default


def test_streaming_chat_joins_to_the_whole_reply(client):
    whole = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=HELLO,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_streaming_completion_is_sse_ending_with_done(served):
    url = served[2] + "/v1/completions"
    body = {"model": NAME, "prompt": "Once upon", "max_tokens": 6, "stream": True}
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_reply_before_it(client):
    free = client.completions.create(model=NAME, prompt="Once upon", max_tokens=24)
    text = free.choices[0].text
    stop = text[6:8]
    r = client.completions.create(model=NAME, prompt="Once upon", max_tokens=24, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.usage.completion_tokens < 24
    streamed = client.completions.create(
        model=NAME, prompt="Once upon", max_tokens=24, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        r = client.chat.completions.create(
            model=NAME,
            messages=HELLO,
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"top_k": 0},
        )
        return r.choices[0].message.content

    greedy = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=16)
    a, b, c = sample(11), sample(11), sample(12)
    assert a == b != c
    assert a != greedy.choices[0].message.content
    zero = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=16, temperature=0)
    assert zero.choices[0].message.content == greedy.choices[0].message.content


def test_concurrent_requests_each_get_their_own_reply(client):
    prompts = [f"Prompt number {i}" for i in range(6)]
    alone = [client.completions.create(model=NAME, prompt=p, max_tokens=8) for p in prompts]

    def ask(p):
        return client.completions.create(model=NAME, prompt=p, max_tokens=8)

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert [r.choices[0].text for r in together] == [r.choices[0].text for r in alone]


def test_waiting_requests_are_decoded_together(loaded):
    model, tok = loaded
    engine = Engine(model, tok, context=256, max_queue=8, compile=False, slots=4)
    release, events = threading.Event(), []

    def hold(kind, data):  # keeps the worker in the first job's prefill
        release.wait(10)
        events.append((0, kind, data))

    def record(i):
        return lambda kind, data: events.append((i, kind, data))

    engine.submit(Job([72, 105], 4, hold))
    for i in range(1, 4):
        engine.submit(Job([72 + i, 101], 6, record(i)))
    engine.start(warm_up=False)
    release.set()
    _idle(engine)
    engine.stop()
    done = {i: data for i, kind, data in events if kind == "done"}
    assert sorted(done) == [0, 1, 2, 3] and engine.stats.served == 4
    assert [len(done[i].ids) for i in range(4)] == [4, 6, 6, 6]
    # all four joined before the first step: 5 steps in all, not 3 + 3 * 5
    assert engine.batch.steps == 5
    for i in range(1, 4):
        alone = sparamx.generate(model, tok, [72 + i, 101], 6, compile=False)
        assert done[i].ids == alone.ids


# ------------------------------------------------------------ bad requests


def _chat(**over):
    body = {"model": NAME, "messages": HELLO, "max_tokens": 4}
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(
    "path, body, status, says",
    [
        ("chat/completions", b"{not json", 400, "not valid JSON"),
        ("chat/completions", b"[1, 2]", 400, "must be a JSON object"),
        ("chat/completions", _chat(model="gpt-4"), 404, "'gpt-4' is not served here"),
        ("chat/completions", _chat(max_tokens=0), 400, "max_tokens must be >= 1"),
        ("chat/completions", _chat(max_tokens=10_000), 400, "at most"),
        ("chat/completions", _chat(max_completion_tokens=-1), 400, "max_completion_tokens"),
        (
            "chat/completions",
            _chat(messages=[{"role": "user", "content": "x" * 300}]),
            400,
            "context is 256",
        ),
        ("chat/completions", _chat(n=2), 400, "n=2 is not supported"),
        ("chat/completions", _chat(messages=None), 400, "invalid field messages"),
        ("chat/completions", _chat(messages=[]), 400, "invalid field messages"),
        ("chat/completions", _chat(messages=[{"role": "user"}]), 400, "has no 'content'"),
        ("chat/completions", _chat(temperature=5), 400, "invalid field temperature"),
        ("chat/completions", _chat(top_p=0), 400, "invalid field top_p"),
        ("chat/completions", _chat(max_tokens="many"), 400, "invalid field max_tokens"),
        ("chat/completions", _chat(stop=[""]), 400, "must not be empty"),
        ("chat/completions", _chat(logprobs=True), 400, "logprobs are not supported"),
        ("chat/completions", _chat(frequency_penalty=0.5), 400, "frequency_penalty"),
        ("chat/completions", _chat(model=None), 400, "invalid field model"),
        ("completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "one string or one list"),
        ("completions", {"model": NAME, "prompt": [5, 10_000]}, 400, "token ids must be in"),
        ("completions", {"model": NAME, "prompt": ""}, 400, "empty"),
        ("completions", {"model": NAME, "prompt": "x", "echo": True}, 400, "echo"),
    ],
)
def test_bad_requests_are_4xx_with_a_reason(served, path, body, status, says):
    code, reply = _post(f"{served[2]}/v1/{path}", body)
    assert code == status, reply
    assert says in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


def test_the_openai_client_sees_the_error_classes(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="n=3 is not supported"):
        client.chat.completions.create(model=NAME, messages=HELLO, n=3)


def test_unknown_route_and_method_are_4xx(served):
    assert _get(served[2] + "/v1/nothing")[0] == 404
    assert _get(served[2] + "/v1/chat/completions")[0] == 405


def test_server_still_serves_after_bad_requests(client):
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=2).usage


# ------------------------------------------------------------ queue, cancel


def test_full_queue_answers_429_then_recovers(served, client):
    server, engine, _ = served
    release, started = threading.Event(), threading.Event()

    def hold(kind, data):  # keeps the worker busy on its first piece of text
        started.set()
        release.wait(10)

    blocker = Job([72, 105], 4, hold)
    engine.submit(blocker)
    assert started.wait(10)
    fillers = [Job([72], 1, lambda k, d: None) for _ in range(engine.max_queue)]
    for job in fillers:
        engine.submit(job)
    try:
        with pytest.raises(openai.RateLimitError, match="server busy"):
            client.completions.create(model=NAME, prompt="x", max_tokens=2)
        code, body = _post(served[2] + "/v1/completions", {"model": NAME, "prompt": "x"})
        assert code == 429 and body["error"]["type"] == "server_busy"
    finally:
        release.set()
    _idle(engine)
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).usage


def test_client_disconnect_cancels_the_generation(served, client):
    _, engine, _ = served
    _idle(engine)
    before = engine.stats.cancelled
    stream = client.completions.create(model=NAME, prompt="Once upon", max_tokens=240, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while engine.stats.cancelled == before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.02)
    _idle(engine)
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).usage


# ------------------------------------------------------------ the command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_sparamx_serve(artifact):
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "sparamx.serve",
        str(artifact),
        "--port",
        str(port),
        "--no-compile",
        "--model-name",
        NAME,
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if _get(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model=NAME, messages=HELLO, max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_refuses_a_missing_artifact(tmp_path, capsys):
    from sparamx import cli

    assert cli.main(["serve", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
