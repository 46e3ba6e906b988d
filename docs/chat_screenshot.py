"""Screenshots of the demo's Chat tab mid-reply and after it, for the README.

Launches ``python app.py`` (the default model unless ``--model``), holds a two-turn chat in
headless Chromium (Debian's ``chromium`` and ``pip install playwright``, as the browser tests
use), and saves ``docs/chat-mid-reply.png`` while the second reply decodes in slow motion,
then ``docs/chat-reply-done.png``::

    python docs/chat_screenshot.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serve_helpers import App  # noqa: E402

CHROMIUM = os.environ.get("FLUID_CHROMIUM", "/usr/bin/chromium")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    try:
        server = App("--model", args.model)
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None
    url = server.url
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#fluid-chat-send", timeout=60_000)

            def send(text: str, slow_ms: int) -> None:
                box = page.locator("#fluid-slow input[type=number]")
                box.fill(str(slow_ms))
                box.press("Enter")
                page.locator("#fluid-chat-message textarea").fill(text)
                page.click("#fluid-chat-send")

            def done(turns: int) -> None:
                page.wait_for_function(
                    f"() => document.querySelector('#fluid-chat .fluid-chat').dataset.turns === '{turns}' && "
                    "document.querySelector('#fluid-status textarea').value.startsWith('done')", timeout=300_000)

            send("Name three planets and one fact about each.", 0)
            done(1)
            send("Which of them is the largest?", 250)
            page.wait_for_function("() => Number((document.querySelectorAll('#fluid-chat .fluid-reply')[1] || "
                                   "{dataset: {}}).dataset.tokens) >= 12", timeout=300_000)
            page.screenshot(path=str(args.out / "chat-mid-reply.png"))
            done(2)
            page.screenshot(path=str(args.out / "chat-reply-done.png"))
            browser.close()
    finally:
        server.stop()
    print(f"wrote {args.out / 'chat-mid-reply.png'} and {args.out / 'chat-reply-done.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
