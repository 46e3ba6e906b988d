"""Aggregate throughput of ``fluid serve`` under load: 1, 4 and 8 concurrent clients, FLUID vs AR.

Starts one real server (the default model unless ``--model``), then for each mode and each
level of concurrency has that many clients send chat requests for the prompts of a JSONL
file (``{"prompt": ...}`` per line), each client taking the next prompt when its reply is
done, until every prompt has been answered once at that level. Aggregate tokens/s is all
completion tokens over the wall time of the level. Prints one table and the ratios
(8 clients over 1, fluid over ar at every level). A warm-up request runs before timing.

The modes take turns at each level, and with ``--rounds`` above 1 the order alternates
(fluid, ar, then ar, fluid, ...), so a machine that speeds up or slows down during the run
(a shared VM does, by 10-20%) biases neither; the table pools each level's rounds (all
their tokens over all their seconds), the JSON also has every round.

    python benchmarks/serve_load.py --model default --max-tokens 128
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serve_helpers import Server  # noqa: E402


def load_prompts(path: Path, limit: int | None) -> list[str]:
    prompts = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


def level(server: Server, model_id: str, prompts: list[str], clients: int, mode: str,
          max_tokens: int) -> dict[str, float]:
    """Answer every prompt once with ``clients`` concurrent clients; aggregate numbers."""
    queue = list(enumerate(prompts))
    tokens = forwards = 0

    def client() -> tuple[int, int]:
        got_tokens = got_forwards = 0
        with httpx.Client(timeout=3600) as http:
            while queue:
                try:
                    _, prompt = queue.pop(0)
                except IndexError:
                    break
                body = {"model": model_id, "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens, "mode": mode}
                answer = http.post(server.base + "/v1/chat/completions", json=body)
                answer.raise_for_status()
                usage = answer.json()["usage"]
                got_tokens += usage["completion_tokens"]
                got_forwards += usage["forwards"]
        return got_tokens, got_forwards

    before = server.health()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for t, f in pool.map(lambda _: client(), range(clients)):
            tokens, forwards = tokens + t, forwards + f
    seconds = time.perf_counter() - start
    after = server.health()
    batch_forwards = after["forwards"] - before["forwards"]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tpf": tokens / forwards if forwards else 0.0,
            "rows_per_forward": forwards / batch_forwards if batch_forwards else 0.0,
            "fed_per_forward": (after["tokens_fed"] - before["tokens_fed"]) / batch_forwards if batch_forwards else 0.0}


def _pooled(found: list[dict[str, float]]) -> dict[str, float]:
    """The rounds of one level as one: all their tokens over all their seconds (the other
    columns averaged), so alternating orders cancel a steady drift of the machine's speed."""
    tokens, seconds = sum(r["tokens"] for r in found), sum(r["seconds"] for r in found)
    mean = {key: sum(r[key] for r in found) / len(found) for key in ("tpf", "rows_per_forward", "fed_per_forward")}
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, **mean}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default",
                        help="model reference, as for `fluid serve` (default, a folder, a .gguf, a cached Hub id)")
    parser.add_argument("--backend", default="torch", help="backend of the server (default: torch)")
    parser.add_argument("--prompts", default=str(ROOT / "benchmarks" / "sharegpt_heldout_10.jsonl"),
                        help="JSONL file of {\"prompt\": ...} lines (default: benchmarks/sharegpt_heldout_10.jsonl)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request (default: 128)")
    parser.add_argument("--clients", default="1,4,8",
                        help="comma-separated levels of concurrency; the server gets as many rows as the "
                             "largest (default: 1,4,8)")
    parser.add_argument("--modes", default="fluid,ar", help="comma-separated decode modes (default: fluid,ar)")
    parser.add_argument("--forward-token-budget", type=int, default=None, metavar="N",
                        help="the server's --forward-token-budget (default: the server's own)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every level this many times, the modes' order alternating (default: 1)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--log", default=str(ROOT / "runs" / "serve_load.log"),
                        help="the server's log (default: runs/serve_load.log in the repository)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    prompts = load_prompts(Path(args.prompts), args.limit)
    levels = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")
    log = Path(args.log).resolve()
    log.parent.mkdir(parents=True, exist_ok=True)
    # the server runs from the repository root: a model folder or file given relative to here
    # is handed over as an absolute path, while clients keep asking for it by the name given
    model_ref = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    model_id = args.model
    server = Server("--model", model_ref, "--model-id", model_id, "--backend", args.backend,
                    "--max-batch", str(max(levels)), "--max-queue", str(max(levels)),
                    *(["--forward-token-budget", str(args.forward_token_budget)]
                      if args.forward_token_budget is not None else []), log=log)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {(m, c): [] for m in modes for c in levels}
    try:
        level(server, model_id, prompts[:1], 1, modes[0], 8)  # warm-up
        for round_ in range(args.rounds):
            for clients in levels:
                for mode in modes if round_ % 2 == 0 else modes[::-1]:
                    runs[mode, clients].append(level(server, model_id, prompts, clients, mode, args.max_tokens))
                    print(f"  round {round_ + 1}: {mode} x{clients}: "
                          f"{runs[mode, clients][-1]['tokens_per_s']:.2f} tok/s", file=sys.stderr)
    finally:
        server.stop()
    rows = {key: _pooled(found) for key, found in runs.items()}
    print(f"{'mode':<6} {'clients':>7} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'TPF':>6} {'rows/fwd':>8} "
          f"{'fed/fwd':>7}")
    for (mode, clients), r in rows.items():
        print(f"{mode:<6} {clients:>7} {r['tokens']:>7.0f} {r['seconds']:>8.2f} {r['tokens_per_s']:>8.2f} "
              f"{r['tpf']:>6.2f} {r['rows_per_forward']:>8.2f} {r['fed_per_forward']:>7.2f}")
    ratios = []
    for mode in modes:
        if (mode, levels[0]) in rows and (mode, levels[-1]) in rows:
            ratios.append(f"{mode} x{levels[-1]}/x{levels[0]}="
                          f"{rows[mode, levels[-1]]['tokens_per_s'] / rows[mode, levels[0]]['tokens_per_s']:.2f}")
    if "fluid" in modes and "ar" in modes:
        ratios += [f"fluid/ar x{c}={rows['fluid', c]['tokens_per_s'] / rows['ar', c]['tokens_per_s']:.2f}"
                   for c in levels]
    print(", ".join(ratios))
    if args.json:
        from fluid_app.files import write_json_atomic  # the package's one file writer

        write_json_atomic(args.json, {f"{m}x{c}": {**r, "rounds": runs[m, c]} for (m, c), r in rows.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
