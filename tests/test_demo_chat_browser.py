"""The Chat tab in a real headless Chromium: three turns, one stopped, each reply checked
against ``fluid generate --messages ... --json`` on the same history; the page readable.

Like ``test_demo_browser.py`` it needs Debian's ``chromium`` and ``pip install playwright``
(no browser download) and skips without them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from test_demo_browser import ARGS, CHROMIUM, MIN_CONTRAST, app_server, set_number, sync_api
from test_demo_browser import OBSERVE as LIVE_OBSERVE

MAX_NEW = 12

# Every distinct state of the chat's block view, recorded as the Live tab's is.
OBSERVE = LIVE_OBSERVE.replace("'#fluid-live'", "'#fluid-chat-live'")
assert OBSERVE != LIVE_OBSERVE  # the chat's own block view is watched


@pytest.fixture(scope="module")
def chat_server(tiny_model_dir, tmp_path_factory):
    """``python app.py`` on a tiny Llama; its console goes to a file the tests read."""
    log = tmp_path_factory.mktemp("chat-server") / "console.txt"
    with app_server(["--model", str(tiny_model_dir("llama")), "--backend", "torch"], log) as url:
        yield url, log


@pytest.fixture(scope="module")
def chat_page(chat_server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(chat_server[0])
        page.wait_for_selector("#fluid-chat-send", timeout=60_000)  # the Chat tab is the first tab
        yield page
        browser.close()


def status(page) -> str:
    return page.locator("#fluid-status textarea").input_value()


def send(page, message: str) -> None:
    page.locator("#fluid-chat-message textarea").fill(message)
    page.evaluate(OBSERVE)
    page.click("#fluid-chat-send")


def wait_done(page, turns: int) -> None:
    page.wait_for_function(
        f"() => document.querySelector('#fluid-chat .fluid-chat').dataset.turns === '{turns}' && "
        "document.querySelector('#fluid-status textarea').value.startsWith('done')", timeout=120_000)


def replies(page) -> list[dict]:
    return page.evaluate("() => [...document.querySelectorAll('#fluid-chat .fluid-reply')].map("
                         "r => ({text: r.dataset.text, state: r.dataset.state}))")


def cli_replies(model: str, histories: list[list[dict]], tmp_path) -> list[dict]:
    """``fluid generate --messages FILE --json`` for each history, the runs side by side."""
    procs = []
    for i, history in enumerate(histories):
        path = tmp_path / f"history{i}.json"
        path.write_text(json.dumps(history))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-m", "fluid_app", "generate", "--model", model, "--backend",
                                       "torch", "--messages", str(path), "--max-new-tokens", str(MAX_NEW), "--json"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        outs.append(json.loads(stdout))
    return outs


def test_three_turns_with_a_stop_equal_the_cli_and_the_page_reads(chat_page, chat_server, tiny_model_dir,
                                                                   tmp_path):
    page = chat_page
    set_number(page, "fluid-max-new", MAX_NEW)
    set_number(page, "fluid-slow", 60)  # slow motion, so the block view's states are on screen

    # turn 1: the block view moves while the reply streams into the transcript
    send(page, "Once upon a time")
    page.wait_for_function("() => document.querySelector('#fluid-chat .fluid-reply[data-state=decoding]')"
                           " && window.__live.some(s => s.includes('fluid-slot fluid-draft'))", timeout=120_000)
    page.screenshot(path=str(tmp_path / "chat-mid-reply.png"))
    wait_done(page, 1)
    states = [s for s in page.evaluate("() => window.__live") if "fluid-slot" in s]
    assert len(set(states)) >= 3 and any("fluid-mask" in s for s in states), states
    assert page.evaluate(MIN_CONTRAST, "#fluid-chat-live") >= 4.5
    legend = page.locator("#fluid-chat .fluid-reply-legend").first.inner_text()
    assert "accepted mask draft" in legend and "bonus token" in legend
    assert "tokens/s" in page.locator("#fluid-chat .fluid-reply-stats").first.inner_text()

    # turn 2: stopped after a few tokens; the partial reply stays, marked stopped
    set_number(page, "fluid-slow", 400)
    send(page, "The quick brown fox")
    page.wait_for_function("() => Number((document.querySelectorAll('#fluid-chat .fluid-reply')[1] || "
                           "{dataset: {}}).dataset.tokens) >= 2", timeout=120_000)
    page.click("#fluid-chat-stop")
    page.wait_for_function("() => document.querySelector('#fluid-status textarea').value === 'stopped'",
                           timeout=10_000)
    time.sleep(1.5)  # an update already in flight may still land
    assert [r["state"] for r in replies(page)] == ["done", "stopped"]

    # turn 3 continues from the partial reply, its prompt mostly from the conversation's cache
    set_number(page, "fluid-slow", 0)
    send(page, "Paris is the")
    wait_done(page, 3)
    reused = re.search(r"; (\d+) prompt tokens reused", status(page))
    assert reused and int(reused.group(1)) > 20, status(page)
    shown = replies(page)
    assert [r["state"] for r in shown] == ["done", "stopped", "done"]

    users = ["Once upon a time", "The quick brown fox", "Paris is the"]
    history: list[dict] = []
    histories = []
    for user, reply in zip(users, shown):
        histories.append(history + [{"role": "user", "content": user}])
        history = histories[-1] + [{"role": "assistant", "content": reply["text"]}]
    full = cli_replies(str(tiny_model_dir("llama")), histories, tmp_path)
    assert shown[0]["text"] == full[0]["text"]
    partial = shown[1]["text"].rstrip("\ufffd")  # a character may be cut mid-way by the stop
    assert full[1]["text"].startswith(partial) and len(shown[1]["text"]) < len(full[1]["text"]), (shown[1], full[1])
    assert shown[2]["text"] == full[2]["text"]

    # Retry regenerates the last reply (greedy: the same text); Clear empties the chat
    # (the status already reads "done" from turn 3: wait until the retried reply has been seen decoding)
    page.evaluate("""() => { window.__retrying = false; const chat = document.querySelector('#fluid-chat');
      new MutationObserver(() => { if (chat.querySelector('.fluid-reply[data-state=decoding]'))
        window.__retrying = true; }).observe(chat, {subtree: true, childList: true, attributes: true}); }""")
    page.click("#fluid-chat-retry")
    page.wait_for_function("() => window.__retrying", timeout=120_000)
    wait_done(page, 3)
    assert replies(page)[2]["text"] == full[2]["text"]
    page.click("#fluid-chat-clear")
    page.wait_for_function("() => document.querySelector('#fluid-chat .fluid-chat').dataset.turns === '0'",
                           timeout=10_000)


def test_an_empty_message_is_one_line_on_the_page_and_in_the_console(chat_page, chat_server):
    page = chat_page
    page.locator("#fluid-chat-message textarea").fill("")
    page.click("#fluid-chat-send")
    page.wait_for_function("() => document.querySelector('#fluid-status textarea').value.startsWith('error')",
                           timeout=30_000)
    assert status(page) == "error: the prompt is empty; pass some text (the Message box)"
    time.sleep(0.5)
    console = chat_server[1].read_text()
    assert "user error: the prompt is empty" in console and "Traceback" not in console, console
