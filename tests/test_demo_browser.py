"""End to end in a real headless Chromium: ``python app.py`` serving, Playwright typing.

Needs Debian's ``chromium`` (/usr/bin/chromium) and ``pip install playwright``; the test
never downloads a browser (no ``playwright install``) and skips cleanly without them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest
from serve_helpers import App

CHROMIUM = os.environ.get("FLUID_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium", allow_module_level=True)

# Records every distinct state of the live view (and of the status box) as the page changes.
OBSERVE = """() => {
  window.__live = []; window.__status = [];
  const live = document.querySelector('#fluid-live');
  const record = () => {
    const view = live.querySelector('.fluid-live');
    const html = view ? view.outerHTML : '';
    if (window.__live[window.__live.length - 1] !== html) window.__live.push(html);
  };
  new MutationObserver(record).observe(live, {subtree: true, childList: true, characterData: true,
                                               attributes: true});
  record();
}"""

# The lowest WCAG contrast ratio between a slot's text and its background, over every slot shown.
MIN_CONTRAST = """(selector) => {
  const rgb = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  let worst = 99;
  for (const slot of document.querySelectorAll(selector + ' .fluid-slot')) {
    const [r, g, b, a = 1] = rgb(getComputedStyle(slot).backgroundColor);
    const bg = [r, g, b].map((c) => a * c + (1 - a) * 255);  // over the white page
    for (const text of slot.querySelectorAll('span')) {
      const fg = rgb(getComputedStyle(text).color);
      const [hi, lo] = [lum(fg), lum(bg)].sort((x, y) => y - x);
      worst = Math.min(worst, (hi + 0.05) / (lo + 0.05));
    }
  }
  return worst;
}"""

# Where the plot's legend sits, against the plot's own box (a legend below the box is clipped).
LEGEND_BOX = """() => {
  const plot = document.querySelector('#fluid-plot').getBoundingClientRect();
  const legend = document.querySelector('#fluid-plot .role-legend');
  if (!legend) return null;
  const box = legend.getBoundingClientRect();
  return {inside: box.top >= plot.top && box.bottom <= plot.bottom && box.height > 0, text: legend.textContent};
}"""


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """``python app.py`` on a tiny Llama (and a tiny GPT-2 to pick), as a user starts it."""
    log = tmp_path_factory.mktemp("demo-server") / "console.txt"
    with app_server(["--model", str(tiny_model_dir("llama")), "--backend", "torch",
                     "--allow-model", str(tiny_model_dir("gpt2"))], log) as url:
        yield url


@contextlib.contextmanager
def app_server(args: list[str], log: Path) -> Iterator[str]:
    """``python app.py ARGS`` on a free port, its console in ``log``; yields the page's URL once
    it answers, and stops the server after."""
    try:
        app = App(*args, log=log)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with app:
        yield app.url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    page.goto(server)
    page.get_by_role("tab", name="Live").click()  # the Chat tab opens first
    page.wait_for_selector("#fluid-generate", timeout=60_000)
    yield page
    page.close()


def set_number(page, elem_id: str, value: float) -> None:
    """Type into a Gradio slider's (or number field's) number box, as a user sets an exact value.

    A slider takes the typed value onto its range input a moment later, and a slider that is
    still being drawn (an accordion just opened, a busy machine) can drop it: clicking on before
    the range shows the value would send the old one. So type again until the range has it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    taken = ("([id, v]) => { const r = document.querySelector(`#${id} input[type=range]`);"
             " return !r || Math.abs(Number(r.value) - v) < 1e-6; }")
    for _ in range(6):
        box.fill(str(value))
        box.press("Enter")
        try:
            page.wait_for_function(taken, arg=[elem_id, value], timeout=5_000)
            return
        except sync_api.TimeoutError:
            page.wait_for_timeout(500)
    raise AssertionError(f"#{elem_id} did not take the value {value}")


def status(page) -> str:
    return page.locator("#fluid-status textarea").input_value()


def test_the_prompt_row_shows_on_the_live_and_race_tabs_only(browser, server):
    """The shared prompt row hides on Chat and shows on Live and Race at once, with no server
    round trip: the tabs are clicked before the page can have made any request of its own."""
    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    page.route("**/gradio_api/**", lambda route: route.abort())  # no event reaches the server
    page.goto(server)
    page.wait_for_selector("#fluid-chat-send", timeout=60_000)
    prompt = page.locator("#fluid-prompt textarea")
    assert not prompt.is_visible()
    for tab, shown in (("Live", True), ("Chat", False), ("Race vs AR", True), ("Chat", False)):
        page.get_by_role("tab", name=tab).click()
        prompt.wait_for(state="visible" if shown else "hidden", timeout=5_000)
    page.close()


def test_live_view_streams_block_states_then_replays(page, tmp_path):
    page.locator("#fluid-prompt textarea").fill("Once upon a time")
    set_number(page, "fluid-max-new", 10)
    set_number(page, "fluid-slow", 100)  # slow motion, so every state is on screen for a moment
    page.evaluate(OBSERVE)
    page.click("#fluid-generate")
    page.wait_for_function("() => window.__live.some(s => s.includes('fluid-slot fluid-draft'))",
                           timeout=120_000)
    page.screenshot(path=str(tmp_path / "fluid-demo-live.png"), full_page=True)  # mid-decode
    page.wait_for_function("() => document.querySelector('#fluid-status textarea').value.startsWith('done')",
                           timeout=120_000)
    states = page.evaluate("() => window.__live")
    final = states[-1]
    intermediate = [s for s in states[:-1] if "fluid-slot" in s]
    assert len(set(intermediate)) >= 2, states
    assert "finished" in final and "fluid-slot" in final
    assert any("fluid-mask" in s for s in intermediate)  # blocks start as masks
    assert page.locator("#fluid-text textarea").input_value().strip() != ""
    assert "10 tokens" in page.locator("#fluid-stats textarea").input_value()
    assert page.evaluate(MIN_CONTRAST, "#fluid-live") >= 4.5  # token text readable on every slot
    page.wait_for_function("() => document.querySelector('#fluid-plot .role-legend')", timeout=30_000)
    legend = page.evaluate(LEGEND_BOX)
    assert legend["inside"] and "mean tokens/forward" in legend["text"], legend

    page.screenshot(path=str(tmp_path / "fluid-demo.png"), full_page=True)
    page.screenshot(path="/tmp/fluid-demo.png", full_page=True)
    shutil.copy(tmp_path / "fluid-demo-live.png", "/tmp/fluid-demo-live.png")
    assert (tmp_path / "fluid-demo.png").stat().st_size > 10_000

    set_number(page, "fluid-replay", 0)  # step back to the first frame
    page.wait_for_function("() => document.querySelector('#fluid-live').innerText.includes('replay: frame 1 of')",
                           timeout=30_000)


def test_sampled_decode_streams_and_repeats_the_library(page, tiny_model_dir):
    """Temperature 0.8 and seed 7 set in the settings, as a user would: the slots move while
    it decodes, and the text is the library's sampled decode with that seed."""
    import fluid_app

    page.locator("#fluid-prompt textarea").fill("Once upon a time")
    set_number(page, "fluid-max-new", 10)
    set_number(page, "fluid-slow", 100)
    page.get_by_text("Model and sampler settings").click()
    page.locator("#fluid-temperature input[type=number]").wait_for(timeout=30_000)
    set_number(page, "fluid-temperature", 0.8)
    set_number(page, "fluid-top-p", 0.9)
    set_number(page, "fluid-seed", 7)
    page.evaluate(OBSERVE)
    page.click("#fluid-generate")
    page.wait_for_function("() => document.querySelector('#fluid-status textarea').value.startsWith('done')",
                           timeout=120_000)
    states = page.evaluate("() => window.__live")
    intermediate = [s for s in states[:-1] if "fluid-slot" in s]
    assert len(set(intermediate)) >= 2, states
    assert "finished" in states[-1]
    assert "temperature 0.8, top-p 0.9, seed 7" in status(page), status(page)
    text = page.locator("#fluid-text textarea").input_value()
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    expected = model.generate("Once upon a time", chat=True, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    assert text.strip() != "" and text == expected.text, (text, expected.text)
    assert text != model.generate("Once upon a time", chat=True, max_new_tokens=10).text  # not greedy


def test_empty_prompt_shows_a_readable_error(page):
    page.locator("#fluid-prompt textarea").fill("")
    page.click("#fluid-generate")
    page.wait_for_function(
        "() => document.querySelector('#fluid-status textarea').value.includes('the prompt is empty')",
        timeout=60_000)
    assert status(page) == "error: the prompt is empty; pass some text (the Prompt box)"
    toast = page.get_by_text("the prompt is empty; pass some text (the Prompt box)").first
    toast.wait_for(timeout=10_000)
    assert "Traceback" not in page.content()


def test_stop_cancels_generation_promptly(page):
    page.locator("#fluid-prompt textarea").fill("Once upon a time")
    set_number(page, "fluid-max-new", 200)
    set_number(page, "fluid-slow", 200)
    page.evaluate(OBSERVE)
    page.click("#fluid-generate")
    page.wait_for_function("() => window.__live.length >= 4", timeout=60_000)
    page.click("#fluid-stop")
    page.wait_for_function("() => document.querySelector('#fluid-status textarea').value === 'stopped'",
                           timeout=10_000)
    time.sleep(1.0)  # a last update may already be in flight
    settled = page.evaluate("() => window.__live.length")
    time.sleep(2.0)  # at 200 ms per update a running decode would add ~10 states here
    assert page.evaluate("() => window.__live.length") == settled
    assert not status(page).startswith("done")
    assert page.locator("#fluid-stats textarea").input_value().startswith("stopped")


def test_model_list_offers_the_served_models_and_takes_no_typing(page, tiny_model_dir):
    page.get_by_text("Model and sampler settings").click()
    box = page.locator("#fluid-model input")
    box.wait_for(timeout=30_000)
    assert box.input_value() == str(tiny_model_dir("llama"))
    assert box.get_attribute("readonly") is not None
    box.click()
    options = page.locator("[role=option]")
    options.first.wait_for(timeout=10_000)
    shown = [text.replace("✓", "").strip() for text in options.all_inner_texts()]
    assert shown == [str(tiny_model_dir("llama")), str(tiny_model_dir("gpt2"))]
    box.press_sequentially("/etc/passwd")
    assert box.input_value() == str(tiny_model_dir("llama"))
