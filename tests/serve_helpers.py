"""Start a real ``fluid serve`` process on a free loopback port, and stop it by its PID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
