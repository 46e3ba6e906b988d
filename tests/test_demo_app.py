"""The Gradio demo served for real on loopback and driven through ``gradio_client``."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import run_cli

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

SETTINGS = dict(max_new_tokens=24, threshold=0.9, k_min=2, k_max=6)


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """The demo on a tiny Llama, two decodes at a time, on 127.0.0.1."""
    from fluid_app.ui.app import launch

    model = str(tiny_model_dir("llama"))
    demo, url = launch(model, "torch", host="127.0.0.1", block=False, concurrency=2)
    try:
        yield model, url, gradio_client.Client(url, verbose=False)
    finally:
        demo.close()


def generate(client, model: str, prompt: str, chat: bool = True, mode: str = "fluid", slow_ms: int = 0,
             **overrides):
    s = {**SETTINGS, **overrides}
    return client.predict(prompt, model, "torch", chat, mode, s["max_new_tokens"], s["threshold"], s["k_min"],
                          s["k_max"], slow_ms, api_name="/generate")


def cli_generate(model: str, prompt: str, mode: str = "fluid") -> dict:
    done = run_cli("generate", "--model", model, "--backend", "torch", "--prompt", prompt, "--chat",
                   "--mode", mode, "--max-new-tokens", str(SETTINGS["max_new_tokens"]),
                   "--threshold", str(SETTINGS["threshold"]), "--k-min", str(SETTINGS["k_min"]),
                   "--k-max", str(SETTINGS["k_max"]), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_demo_gives_the_same_text_as_fluid_generate(served):
    model, _, client = served
    status, live, text, _plot, _stats, result, replay = generate(client, model, "Once upon a time")
    expected = cli_generate(model, "Once upon a time")
    assert text == expected["text"]
    assert result["token_ids"] == expected["token_ids"] and result["forwards"] == expected["forwards"]
    assert status.startswith("done") and "fluid-slot" in live
    assert replay["maximum"] >= 3  # the replay slider spans the recorded frames


def test_every_mode_streams_the_same_greedy_text(served):
    model, _, client = served
    texts = {mode: generate(client, model, "The quick brown fox", mode=mode)[2] for mode in ("ar", "reference")}
    texts["fluid"] = generate(client, model, "The quick brown fox")[2]
    assert texts["ar"] == texts["reference"] == texts["fluid"] != ""


def test_race_reports_identical_outputs_and_a_speedup(served):
    model, _, client = served
    s = SETTINGS
    status, ar_html, ar_text, ar_stats, fl_html, fl_text, fl_stats, summary = client.predict(
        "Paris is the capital of", model, "torch", True, s["max_new_tokens"], s["threshold"], s["k_min"],
        s["k_max"], api_name="/race")
    assert status == "done" and ar_text == fl_text != ""
    assert "identical outputs" in summary and "× AR" in summary
    assert ar_stats.startswith("finished") and "tokens/s" in fl_stats
    assert "fluid-slot" in ar_html and "fluid-slot" in fl_html


@pytest.mark.parametrize("prompt, model, k_min, k_max, message", [
    ("   ", None, 2, 6, "the prompt is empty"),
    ("hi", "/no/such/model", 2, 6, "/no/such/model"),
    ("hi", None, 8, 4, "k_min (8) is larger than k_max (4)"),
])
def test_bad_input_is_a_one_line_message(served, prompt, model, k_min, k_max, message):
    tiny, _, client = served
    with pytest.raises(gradio_client.exceptions.AppError) as caught:
        generate(client, model or tiny, prompt, k_min=k_min, k_max=k_max)
    text = str(caught.value)
    assert message in text and "Traceback" not in text and "\n" not in text.strip()


def test_concurrent_clients_get_their_own_complete_outputs(served):
    import fluid_app

    model, url, _ = served
    prompts = ["The quick brown fox", "def add(a, b):"]
    reference = fluid_app.load(model, backend="torch", device="cpu")
    expected = [reference.generate(p, chat=True, **SETTINGS).text for p in prompts]
    results: dict[int, tuple] = {}
    spans: dict[int, tuple[float, float]] = {}

    def user(i: int) -> None:  # each user has its own client (its own Gradio session)
        client = gradio_client.Client(url, verbose=False)
        started = time.perf_counter()
        results[i] = generate(client, model, prompts[i], slow_ms=10)
        spans[i] = (started, time.perf_counter())

    threads = [threading.Thread(target=user, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1]
    for i in range(2):
        assert results[i][2] == expected[i]
        assert results[i][5]["new_tokens"] == len(results[i][5]["token_ids"])
    assert expected[0] != expected[1]
    # the two decodes really ran at the same time on the one cached model object
    assert max(spans[0][0], spans[1][0]) < min(spans[0][1], spans[1][1])


def test_fluid_demo_with_a_bad_model_exits_2_with_one_line():
    done = run_cli("demo", "--model", "/no/such/model", "--backend", "torch", timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr


@pytest.mark.slow
def test_default_smollm2_streams_its_greedy_answer(smollm2):
    """The embedded default model through the page, chat template and all (no second load)."""
    from fluid_app.ui.app import DemoApp, theme
    from fluid_app.ui.runner import ModelCache

    cache = ModelCache()
    cache.put("default", "torch", smollm2)
    demo = DemoApp(cache, "default", "torch").build()
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, theme=theme(), ssr_mode=False,
                            quiet=True)
    try:
        client = gradio_client.Client(url, verbose=False)
        out = generate(client, "default", "What is the capital of France?", max_new_tokens=40, k_min=4, k_max=16)
    finally:
        demo.close()
    # the adapted default names Paris at the end of its first sentences, not in its first words
    expected = smollm2.generate("What is the capital of France?", chat=True, max_new_tokens=40, k_min=4, k_max=16)
    assert out[2] == expected.text and "Paris" in out[2]
    assert out[5]["token_ids"] == expected.token_ids
