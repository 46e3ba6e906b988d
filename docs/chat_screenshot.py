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
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("FLUID_CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    server = subprocess.Popen([sys.executable, "app.py", "--model", args.model, "--port", str(port)], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("error: app.py exited before serving its page") from None
                time.sleep(0.5)
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
        server.terminate()
        server.wait(timeout=60)
    print(f"wrote {args.out / 'chat-mid-reply.png'} and {args.out / 'chat-reply-done.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
