"""Streamed text on a real byte-level BPE tokenizer: however the tokens are split into commits,
the pieces add up to the decoded reply, never show half a character, and never show any part
of a stop string, even one that spans commits."""

from __future__ import annotations

import random

from tiny_models import build_tokenizer

from fluid_app.text_stream import TextStream

TEXT = "Paris is the capital of France. Le café — 東京 🚀 end. The quick brown fox."


def chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 5)
        out.append(ids[i:i + n])
        i += n
    return out


def run(tokenizer, ids, stop, rng) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(block) for block in chunks(ids, rng)]
    pieces.append(stream.finish())
    return pieces, stream


def test_pieces_are_whole_characters_and_add_up():
    tokenizer = build_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    assert len(ids) > len(TEXT) / 3  # multi-byte characters are split across tokens
    for seed in range(20):
        pieces, stream = run(tokenizer, ids, [], random.Random(seed))
        assert "".join(pieces) == tokenizer.decode(ids) == stream.text
        assert not any("\ufffd" in p for p in pieces)


def test_stop_strings_never_leak_across_commits():
    tokenizer = build_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    for stop, cut in [("capital of", "Paris is the "), ("東京", "Paris is the capital of France. Le café — "),
                      ("fox.", TEXT[: TEXT.index("fox.")]), ("absent", TEXT)]:
        for seed in range(20):
            pieces, stream = run(tokenizer, ids, ["zzz", stop], random.Random(seed))
            assert "".join(pieces) == cut, (stop, seed, pieces)
            assert stream.stopped == (stop != "absent")


def test_token_ids_are_accounted_with_the_text():
    """``emitted_tokens`` only counts tokens whose text is all shown; after a stop string the
    reply's ids end at the token completing it, however the commits were split."""
    tokenizer = build_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    for stop in ["capital of", "東京", "🚀", "fox.", None]:
        stops = ["zzz", stop] if stop else ["zzz"]
        for seed in range(10):
            stream, emitted = TextStream(tokenizer, stops), 0
            for block in chunks(ids, random.Random(seed)):
                stream.push(block)
                assert stream.emitted_tokens >= emitted
                emitted = stream.emitted_tokens
                assert stream.text.startswith(tokenizer.decode(ids[:emitted]))
                assert emitted == len(stream.token_ids) or not stream.text.startswith(
                    tokenizer.decode(ids[:emitted + 1]))
            stream.finish()
            got = stream.completion_ids
            if stop is None:
                assert got == ids and stream.emitted_tokens == len(ids)
            else:
                assert stop in tokenizer.decode(got) and stop not in tokenizer.decode(got[:-1]), (stop, seed)
                assert got == ids[: len(got)] and stream.emitted_tokens < len(got)
