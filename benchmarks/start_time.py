"""Wall-clock start-up of the ``fluid`` command and the demo, cold and warm.

Run from the repository root (``python -m fluid_app`` and ``app.py`` then load this
checkout's code)::

    python benchmarks/start_time.py --runs 3                 # everything
    python benchmarks/start_time.py --runs 3 --only generate # one measurement

What is timed, each ``--runs`` times (min and median printed):

* ``help``: ``python -m fluid_app --help``.
* ``generate cold``: ``python -m fluid_app generate --model default --chat --prompt Hi
  --max-new-tokens 4`` with an empty conversion cache (``FLUID_CACHE`` a new folder).
* ``generate warm``: the same with the cache filled by a previous run.
* ``app http`` and ``app answer`` (warm cache): ``python app.py --port P`` until ``GET /``
  answers, then until the Chat tab's ``/chat`` endpoint has answered the message "Hi"
  (4 tokens).

The cache folders are temporary: the user's own cache is never read or written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from serve_helpers import App  # noqa: E402

GENERATE = ["generate", "--model", "default", "--chat", "--prompt", "Hi", "--max-new-tokens", "4"]


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def app_times(env: dict[str, str]) -> tuple[float, float]:
    """Seconds from launching ``app.py`` to an HTTP answer, and to a decoded reply."""
    from gradio_client import Client

    started = time.perf_counter()
    try:
        app = App(env=env, timeout=900)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    with app:
        client = Client(app.url, verbose=False)
        transcript = client.predict("Hi", "", "default", "auto", 4, 0.9, 5, 8, 0, api_name="/chat")[0]
        answered = time.perf_counter() - started
        if "Hi" not in transcript:
            raise SystemExit(f"the Chat tab did not answer: {transcript[:500]}")
        return app.ready_after, answered


def summary(name: str, values: list[float]) -> dict:
    row = {"what": name, "runs": [round(v, 2) for v in values], "min": round(min(values), 2),
           "median": round(statistics.median(values), 2)}
    print(f"{name:16s} min {row['min']:7.2f} s  median {row['median']:7.2f} s  runs {row['runs']}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["help", "generate", "app"], default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fluid-start-") as scratch:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", GRADIO_ANALYTICS_ENABLED="False")
        warm = dict(env, FLUID_CACHE=str(Path(scratch) / "warm"))
        if args.only in (None, "help"):
            rows.append(summary("help", [timed(["-m", "fluid_app", "--help"], env) for _ in range(args.runs)]))
        if args.only in (None, "generate"):
            cold = [timed(["-m", "fluid_app", *GENERATE], dict(env, FLUID_CACHE=str(Path(scratch) / f"cold{i}")))
                    for i in range(args.runs)]
            rows.append(summary("generate cold", cold))
            timed(["-m", "fluid_app", *GENERATE], warm)  # fills the warm cache
            rows.append(summary("generate warm", [timed(["-m", "fluid_app", *GENERATE], warm)
                                                  for _ in range(args.runs)]))
        if args.only in (None, "app"):
            timed(["-m", "fluid_app", *GENERATE], warm)
            http, answer = zip(*(app_times(warm) for _ in range(args.runs)))
            rows.append(summary("app http", list(http)))
            rows.append(summary("app answer", list(answer)))
    if args.json:
        from fluid_app.files import write_json_atomic

        write_json_atomic(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
