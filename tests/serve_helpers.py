"""Start a real ``fluid serve`` process, or the demo (``python app.py``), on a free loopback
port; stop it by its PID. Tests, benchmarks and the screenshot script share these."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, *args: str, log: Path, key: str | None = None, timeout: float = 300):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.key = key
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        command = [sys.executable, "-m", "fluid_app", "serve", "--port", str(self.port), *args]
        if key:
            command += ["--api-key", key]
        self.log = log
        with open(log, "w") as out:  # the child keeps its own handle on the file
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fluid serve exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"fluid serve did not start: {log.read_text()[-3000:]}")

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=10).json()["fluid"]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.key or "none", max_retries=0, timeout=300)

    def stop(self) -> None:
        _stop(self.proc)


class App:
    """``python app.py ARGS`` on a free port, its console in ``log`` (else discarded); returns
    once the page answers. ``ready_after`` is the seconds from launch to that first answer."""

    def __init__(self, *args: str, log: Path | None = None, env: dict[str, str] | None = None, timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        env = dict(env or os.environ, GRADIO_ANALYTICS_ENABLED="False",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        started = time.perf_counter()
        out = open(log, "w") if log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen([sys.executable, "app.py", *args, "--port", str(self.port)], cwd=ROOT,
                                         env=env, stdout=out, stderr=subprocess.STDOUT)
        finally:
            if log:
                out.close()  # the child keeps its own handle on the file
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=2) as page:
                    if page.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                console = log.read_text()[-3000:] if log else "(console not kept)"
                raise RuntimeError(f"app.py did not serve its page:\n{console}")
            time.sleep(0.1)
        self.ready_after = time.perf_counter() - started

    def __enter__(self) -> "App":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
