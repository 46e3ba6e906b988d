"""The Gradio demo served for real on loopback and driven through ``gradio_client``."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from conftest import run_cli

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

SETTINGS = dict(max_new_tokens=24, threshold=0.9, k_min=2, k_max=6)


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """The demo on a tiny Llama (spelt three ways) plus a tiny GPT-2, two decodes at a time, on 127.0.0.1."""
    from fluid_app.ui.app import launch

    model = str(tiny_model_dir("llama"))
    demo, url = launch(model, "torch", host="127.0.0.1", block=False, concurrency=2,
                       allow_models=[f"{model}/", str(tiny_model_dir("gpt2")), f"{model}/../{Path(model).name}"])
    try:
        yield model, url, gradio_client.Client(url, verbose=False)
    finally:
        demo.close()


def generate(client, model: str, prompt: str, chat: bool = True, mode: str = "fluid", slow_ms: int = 0,
             sampling: tuple | None = None, **overrides):
    """``/generate`` as callers wrote it before sampling existed (10 arguments), or with the
    sampling arguments ``(temperature, top_p, top_k, seed)`` appended."""
    s = {**SETTINGS, **overrides}
    return client.predict(prompt, model, "torch", chat, mode, s["max_new_tokens"], s["threshold"], s["k_min"],
                          s["k_max"], slow_ms, *(sampling or ()), api_name="/generate")


def race(client, model: str, prompt: str, sampling: tuple | None = None):
    s = SETTINGS
    return client.predict(prompt, model, "torch", True, s["max_new_tokens"], s["threshold"], s["k_min"],
                          s["k_max"], *(sampling or ()), api_name="/race")


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
    status, ar_html, ar_text, ar_stats, fl_html, fl_text, fl_stats, summary = race(
        client, model, "Paris is the capital of")
    assert status == "done" and ar_text == fl_text != ""
    assert "identical outputs" in summary and "× AR" in summary
    assert ar_stats.startswith("finished") and "tokens/s" in fl_stats
    assert "fluid-slot" in ar_html and "fluid-slot" in fl_html


@pytest.fixture(scope="module")
def library(served):
    """The served tiny Llama loaded again in this process, to compare the page with the library."""
    import fluid_app

    return fluid_app.load(served[0], backend="torch", device="cpu")


def test_sampled_generate_repeats_with_its_seed_and_equals_the_library(served, library):
    """Temperature 0.8 through the page: one seed, one text, the library's own; a new seed, a
    new text (a tiny random model's distribution is close to flat, so two seeds do differ)."""
    model, _, client = served
    prompt = "Once upon a time"
    first = generate(client, model, prompt, sampling=(0.8, 1.0, 0, 11))
    again = generate(client, model, prompt, sampling=(0.8, 1.0, 0, 11))
    expected = library.generate(prompt, chat=True, **SETTINGS, temperature=0.8, seed=11)
    assert first[0].startswith("done") and "temperature 0.8, seed 11" in first[0]
    assert first[2] == again[2] == expected.text != ""
    assert first[5]["token_ids"] == expected.token_ids and first[5]["sampling"]["seed"] == 11
    assert generate(client, model, prompt, sampling=(0.8, 1.0, 0, 12))[2] != first[2]
    greedy = library.generate(prompt, chat=True, **SETTINGS).text
    assert first[2] != greedy  # the sampling arguments reached the sampler
    assert generate(client, model, prompt)[2] == greedy  # callers without them still decode greedily


def test_an_empty_seed_draws_a_new_one_and_reports_it(served, library):
    model, _, client = served
    prompt = "The quick brown fox"
    runs = [generate(client, model, prompt, sampling=(0.8, 0.95, 40, seed)) for seed in (-1, None)]
    seeds = [run[5]["sampling"]["seed"] for run in runs]
    assert seeds[0] != seeds[1] and runs[0][2] != runs[1][2]  # a fresh seed each run
    for run, seed in zip(runs, seeds):  # ... that repeats the run
        expected = library.generate(prompt, chat=True, **SETTINGS, temperature=0.8, top_p=0.95, top_k=40, seed=seed)
        assert run[2] == expected.text and f"seed {seed}" in run[0]


def test_sampled_race_reports_both_speeds_and_claims_no_identical_text(served, library):
    """Both runs get the one seed: each equals the library's decode in its mode with it."""
    model, _, client = served
    prompt = "Paris is the capital of"
    status, _, ar_text, ar_stats, _, fl_text, fl_stats, summary = race(client, model, prompt, (0.8, 1.0, 0, 5))
    assert status == "done" and "tokens/s" in ar_stats and "tokens/s" in fl_stats
    for mode, text in (("ar", ar_text), ("fluid", fl_text)):
        assert text == library.generate(prompt, chat=True, mode=mode, **SETTINGS, temperature=0.8, seed=5).text
    assert "× AR" in summary and summary.count("tokens/s") == 2 and summary.count("TPF") == 2
    assert "sampled (temperature 0.8, seed 5)" in summary and "differ by design" in summary
    assert "identical" not in summary.lower() and "DIFFER" not in summary and "bug" not in summary


@pytest.mark.parametrize("mode, sampling, control, message", [
    ("fluid", (-1, 1.0, 0, 1), "the Temperature slider", "Temperature -1 is out of range; pick a value from 0 to 2"),
    ("fluid", (0.8, 0.0, 0, 1), "the Top-p slider", "Top-p 0 is out of range"),
    ("fluid", (0.8, 1.0, -3, 1), "the Top-k box", "top_k must be a whole number"),
    ("fluid", (0.8, 1.0, 0, -5), "the Seed box", "seed must be a whole number"),
    ("reference", (0.8, 1.0, 0, 1), "the Temperature slider, the Mode choice", "reference mode"),
])
def test_bad_sampling_is_a_one_line_message_naming_the_control(served, mode, sampling, control, message):
    tiny, _, client = served
    calls = [lambda: generate(client, tiny, "hi", mode=mode, sampling=sampling)]
    if mode == "fluid":
        calls.append(lambda: race(client, tiny, "hi", sampling))
    for call in calls:
        with pytest.raises(gradio_client.exceptions.AppError) as caught:
            call()
        text = str(caught.value)
        assert message in text and f"({control})" in text, text
        assert "Traceback" not in text and "\n" not in text.strip()


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


def test_the_model_list_serves_only_the_allowed_models(served, tiny_model_dir, tmp_path, capfd):
    """Listed models load; anything else gets one message, the same whether the path is an
    existing file, an existing folder (even a real model) or nothing at all: the value is
    checked against the list, never looked up on the server's disk. The server's console
    gets one line per refusal, not a traceback."""
    model, _, client = served
    gpt2 = str(tiny_model_dir("gpt2"))
    listed = [c for c in client.config["components"] if c.get("props", {}).get("elem_id") == "fluid-model"]
    assert [value for _, value in listed[0]["props"]["choices"]] == [model, gpt2]  # three spellings, one entry
    assert generate(client, gpt2, "Once upon a time")[0].startswith("done")
    (tmp_path / "notes.txt").write_text("private")
    probes = [str(tmp_path / "notes.txt"), str(tmp_path), str(tiny_model_dir("qwen2")), str(tmp_path / "missing"),
              f"{model}/", f"{gpt2}/../{Path(gpt2).name}", "package:fluid_app/../../../../../../etc/passwd"]
    messages = set()
    for probe in probes:
        with pytest.raises(gradio_client.exceptions.AppError) as caught:
            generate(client, probe, "hi")
        messages.add(str(caught.value).replace(probe, "X"))
    assert len(messages) == 1, messages  # Gradio's own answer for a value not in the list, whatever it names
    assert "X is not in the list of choices" in messages.pop()
    console = capfd.readouterr().err
    assert "Traceback" not in console and console.count("user error: ") >= len(probes), console


def _two_users_at_once(model: str, loaded, concurrency: int) -> tuple[int, dict[int, tuple]]:
    """Two clients send their decodes at the same moment to a demo serving ``concurrency``
    decodes at once; returns the most decodes the server ran together, and the results."""
    from fluid_app.ui.app import DemoApp, theme
    from fluid_app.ui.runner import ModelCache

    app = DemoApp(ModelCache(loader=lambda reference, backend: loaded), model, "torch", concurrency=concurrency)
    demo = app.build()
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, theme=theme(), ssr_mode=False,
                            quiet=True)
    results: dict[int, tuple] = {}
    try:
        clients = [gradio_client.Client(url, verbose=False) for _ in range(2)]  # each its own session
        start = threading.Barrier(2)

        def user(i: int) -> None:
            start.wait()
            results[i] = generate(clients[i], model, PROMPTS[i], slow_ms=60)

        threads = [threading.Thread(target=user, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    finally:
        demo.close()
    return app.activity.peak, results


PROMPTS = ["The quick brown fox", "def add(a, b):"]


def test_concurrent_clients_decode_at_the_same_time_and_get_their_own_outputs(tiny_model_dir):
    """Overlap is measured on the server, inside the handlers (after the queue): with one
    decode at a time the same two users are served one after the other, and it says so."""
    import fluid_app

    model = str(tiny_model_dir("llama"))
    loaded = fluid_app.load(model, backend="torch", device="cpu")
    expected = [loaded.generate(p, chat=True, **SETTINGS).text for p in PROMPTS]
    assert expected[0] != expected[1]
    for concurrency, peak_expected in ((2, 2), (1, 1)):
        peak, results = _two_users_at_once(model, loaded, concurrency)
        assert sorted(results) == [0, 1]
        for i in range(2):  # each user got its own complete decode from the one shared model object
            assert results[i][2] == expected[i]
            assert results[i][5]["new_tokens"] == len(results[i][5]["token_ids"])
        assert peak == peak_expected, f"concurrency {concurrency}: {peak} decodes ran at once"


def test_allow_any_model_is_refused_on_an_exposed_demo():
    """A free-text model box is for this machine's own user: never with a share link or on a
    reachable address (checked before any model loads, so a missing model is not the error)."""
    for exposure, flag in ((["--share"], "--share"), (["--host", "0.0.0.0"], "--host")):
        done = run_cli("demo", "--model", "/no/such/model", "--allow-any-model", *exposure, timeout=300)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "--allow-any-model" in lines[0] and flag in lines[0] and "/no/such/model" not in lines[0]
    done = run_cli("demo", "--model", "/no/such/model", "--auth", "no-colon", timeout=300)
    assert done.returncode == 2 and "--auth" in done.stderr.splitlines()[-1], done.stderr


def test_login_is_required_when_auth_is_set(tiny_model_dir):
    from fluid_app.ui.app import launch

    model = str(tiny_model_dir("llama"))
    demo, url = launch(model, "torch", host="127.0.0.1", block=False, preload=False,
                       auth=[("ada", "lovelace:1843"), ("alan", "turing")])
    try:
        with pytest.raises(gradio_client.exceptions.AuthenticationError):
            gradio_client.Client(url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            gradio_client.Client(url, verbose=False, auth=("ada", "wrong"))
        client = gradio_client.Client(url, verbose=False, auth=("ada", "lovelace:1843"))
        assert generate(client, model, "Once upon a time", max_new_tokens=4)[0].startswith("done")
    finally:
        demo.close()


def test_logins_come_from_flags_and_a_file(tmp_path):
    from fluid_app.commands.demo import read_auth
    from fluid_app.errors import FluidError

    (tmp_path / "logins").write_text("# who may use the demo\nada:lovelace:1843\n\n  alan:turing \n")
    assert read_auth(["grace:hopper"], str(tmp_path / "logins")) == [
        ("grace", "hopper"), ("ada", "lovelace:1843"), ("alan", "turing")]
    for pairs, file, param in ((["nopassword:"], None, "auth"), ([":x"], None, "auth"),
                               ([], str(tmp_path / "missing"), "auth_file")):
        with pytest.raises(FluidError) as caught:
            read_auth(pairs, file)
        assert caught.value.params == (param,)
    (tmp_path / "empty").write_text("# nobody\n")
    with pytest.raises(FluidError, match="no user:password"):
        read_auth([], str(tmp_path / "empty"))


def test_fluid_demo_with_a_bad_model_exits_2_with_one_line():
    done = run_cli("demo", "--model", "/no/such/model", "--backend", "torch", timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr


@pytest.mark.slow
def test_default_smollm2_streams_its_greedy_answer(smollm2):
    """The embedded default model through the page, chat template and all (no second load)."""
    from fluid_app.ui.app import DemoApp, theme
    from fluid_app.ui.runner import ModelCache

    cache = ModelCache(loader=lambda model, backend: smollm2)
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


def test_the_k_min_slider_follows_the_checkpoints_default_when_the_temperature_crosses_zero():
    """The Temperature slider's input handler: a k_min still at the greedy default becomes the
    checkpoint's sampling_k_min above 0 and goes back at 0; a value the visitor chose stays."""
    from fluid_app.ui.app import DemoApp
    from fluid_app.ui.runner import ModelCache

    app = DemoApp(ModelCache(), "default", "torch", defaults={"k_min": 5, "k_max": 8, "sampling_k_min": 3})
    assert [app.k_min_for(t, k) for t, k in ((0.8, 5), (0.0, 3), (0.8, 7), (0.0, 7), (0.0, 5), (0.8, 3))] \
        == [3, 5, 7, 7, 5, 3]
    plain = DemoApp(ModelCache(), "default", "torch", defaults={"k_min": 5, "k_max": 8})
    assert [plain.k_min_for(t, 5) for t in (0.8, 0.0)] == [5, 5]
