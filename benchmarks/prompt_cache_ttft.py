"""Time to first token of a chat's 5th turn: prompt cache versus a cold prefill.

Builds a conversation from held-out ShareGPT questions, with the model's own replies, until
the history before the 5th user message holds about ``--history-tokens`` tokens. Then, for
each repeat, it times the first token of turn 5 twice: cold (the whole history prefilled)
and warm (a fresh prompt cache that has just decoded turn 4, as a chat would have it). Both
replies' first tokens must be equal. Prints the medians and their ratio (the goal: <= 0.3).

    python benchmarks/prompt_cache_ttft.py --model default --history-tokens 600
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fluid_app  # noqa: E402
from fluid_app.events import Commit  # noqa: E402
from fluid_app.prompt_cache import PromptCache  # noqa: E402


def first_token(model, ids, cache):
    """Seconds from the call to the first committed token, and that token."""
    started = time.perf_counter()
    stream = model.stream(ids, prompt_cache=cache, max_new_tokens=2)
    for event in stream:
        if isinstance(event, Commit):
            seconds = time.perf_counter() - started
            stream.close()
            return seconds, event.tokens[0]
    raise RuntimeError("the decode ended without a token")


def build_history(model, questions, reply_tokens, turns=5):
    """Four user turns with the model's replies (``reply_tokens`` at most each); returns the
    message lists of turns 4 and 5."""
    history: list[dict[str, str]] = []
    for question in questions[: turns - 1]:
        history.append({"role": "user", "content": question})
        turn4 = list(history)
        reply = model.generate(model.encode_chat(history), max_new_tokens=reply_tokens)
        history.append({"role": "assistant", "content": reply.text})
    return turn4, history + [{"role": "user", "content": questions[turns - 1]}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--history-tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", default=str(ROOT / "benchmarks" / "sharegpt_heldout_10.jsonl"))
    args = parser.parse_args(argv)

    questions = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    model = fluid_app.load(args.model, backend=args.backend)
    model.generate("Hello", max_new_tokens=4)  # warm-up: one-off setup costs land here
    reply_tokens = max(8, args.history_tokens // 4)
    turn4, turn5 = build_history(model, questions, reply_tokens)
    ids4, ids5 = model.encode_chat(turn4), model.encode_chat(turn5)
    cold, warm, reused = [], [], 0
    for _ in range(args.repeats):
        seconds, cold_token = first_token(model, ids5, None)
        cold.append(seconds)
        cache = PromptCache(model.backend)
        model.generate(ids4, prompt_cache=cache, max_new_tokens=reply_tokens)  # the chat's turn 4
        seconds, warm_token = first_token(model, ids5, cache)
        warm.append(seconds)
        reused = cache.reused
        if warm_token != cold_token:
            raise SystemExit(f"the cached first token {warm_token} differs from the cold one {cold_token}")
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    print(json.dumps({"model": args.model, "backend": model.backend.name, "history_tokens": len(ids5),
                      "reused_tokens": reused, "prefilled_tokens": len(ids5) - reused,
                      "cold_ttft_s": round(cold_s, 4), "cached_ttft_s": round(warm_s, 4),
                      "ratio": round(warm_s / cold_s, 3), "repeats": args.repeats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
