"""The draft store: its lookups equal a brute-force scan, its drafts leave greedy output
unchanged and sampled output exactly distributed, it really saves forwards, the embedded
default ships one, and a bad store file is one ``error:`` line, never code run from data."""

from __future__ import annotations

import functools
import io
import json
import zipfile

import numpy as np
import pytest
from conftest import run_cli
from distribution_checks import assert_matches
from test_cli import assert_one_line_error
from test_sampling import SAMPLING, decode_counts, joint
from toy_backend import SamplingToyLM, ToyLM

from fluid_app.draft_store import FILENAME, MAX_OCCURRENCES, NGRAM, DraftStore, load_draft_store, pack_replies
from fluid_app.errors import FluidError
from fluid_app.sampler import Decoder, DecodeSettings


def _oracle(replies: list[list[int]], context: list[int], num_tokens: int) -> list[int]:
    """Brute force: every place in every reply where the context's last NGRAM tokens occur,
    spread to at most MAX_OCCURRENCES in corpus order; then one token at a time, the most
    common next token (ties: the smaller id) among the places that agree so far, stopping at
    a reply's end or once fewer than two places agree (after the first token)."""
    if len(context) < NGRAM or num_tokens < 1:
        return []
    tail = context[-NGRAM:]
    places = [(r, i + NGRAM) for r, reply in enumerate(replies) for i in range(len(reply) - NGRAM + 1)
              if reply[i:i + NGRAM] == tail]
    if len(places) > MAX_OCCURRENCES:
        places = places[:: -(-len(places) // MAX_OCCURRENCES)]
    draft: list[int] = []
    while len(draft) < num_tokens:
        following = [(replies[r][i], (r, i)) for r, i in places if i < len(replies[r])]
        if not following:
            break
        counts: dict[int, int] = {}
        for token, _ in following:
            counts[token] = counts.get(token, 0) + 1
        best = min(counts, key=lambda t: (-counts[t], t))
        if draft and counts[best] < 2:
            break
        draft.append(best)
        places = [(r, i + 1) for token, (r, i) in following if token == best]
    return draft


def test_continuation_matches_a_brute_force_scan():
    rng = np.random.default_rng(0)
    hits = longer = 0
    for _ in range(300):
        alphabet = int(rng.integers(2, 6))
        replies = [[int(t) for t in rng.integers(0, alphabet, size=int(rng.integers(0, 30)))]
                   for _ in range(int(rng.integers(1, 12)))]
        if not any(replies):
            continue
        store = DraftStore(pack_replies(replies))
        for _ in range(8):
            context = [int(t) for t in rng.integers(0, alphabet, size=int(rng.integers(0, 6)))]
            num = int(rng.integers(1, 8))
            expected = _oracle(replies, context, num)
            assert store.continuation(context, num) == expected, (replies, context, num)
            hits += bool(expected)
            longer += len(expected) > 1
    assert hits > 500 and longer > 200  # found, not found, and multi-token drafts all exercised
    # more occurrences than MAX_OCCURRENCES: the evenly spread subset decides
    replies = [[1, 2, 3, 4 + (i % 4 == 0)] for i in range(3 * MAX_OCCURRENCES)]
    store = DraftStore(pack_replies(replies))
    assert store.continuation([9, 1, 2, 3], 4) == _oracle(replies, [9, 1, 2, 3], 4) == [4]


def test_loading_defers_the_index_to_the_first_lookup(tmp_path):
    """Sorting a store's n-grams costs a third of a second for the default's: a model load
    (every `fluid` start, the demo, the server) pays it only once a draft is looked up."""
    from fluid_app.draft_store import save_draft_store

    save_draft_store(pack_replies([[1, 2, 3, 4], [1, 2, 3, 4]]), tmp_path / FILENAME)
    store = load_draft_store(tmp_path / FILENAME, vocab_size=8)
    assert store._index is None
    assert store.continuation([1, 2, 3], 2) == [4]
    assert store._index is not None


def test_the_separator_and_large_vocabularies():
    """An n-gram never spans two replies; ids past uint16 get a uint32 store; the largest id the
    index can key is refused with a clear line."""
    store = DraftStore(pack_replies([[1, 2], [3, 4, 5]]))
    assert store.continuation([1, 2, 3], 2) == []  # "1 2 | 3" crosses a reply's end
    big = pack_replies([[70_000, 70_001, 70_002, 7], [70_000, 70_001, 70_002, 7]])
    assert big.dtype == np.uint32 and DraftStore(big).continuation([70_000, 70_001, 70_002], 3) == [7]
    with pytest.raises(FluidError, match="too large"):
        pack_replies([[1 << 21]])


def _store_for(lm: ToyLM, prompts: list[list[int]], n: int, junk: int = 0) -> DraftStore:
    """A store of the toy's own greedy replies to other prompts (as `fluid distill` makes), plus junk."""
    rng = np.random.default_rng(7)
    replies = [lm.greedy(p, n) for p in prompts]
    replies += [[int(t) for t in rng.integers(3, lm.vocab_size, size=40)] for _ in range(junk)]
    return DraftStore(pack_replies(replies))


def _prompts(seed: int, count: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 64, size=int(rng.integers(1, 12)))] for _ in range(count)]


@pytest.mark.parametrize("settings", [dict(k_min=2, k_max=8, threshold=0.9, prompt_lookup_num_tokens=5),
                                      dict(k_min=1, k_max=6, threshold=1.0, prompt_lookup_num_tokens=10),
                                      dict(k_min=4, k_max=4, threshold=0.5, prompt_lookup_num_tokens=3)])
def test_store_drafts_keep_greedy_output_and_save_forwards(settings):
    lm = ToyLM(vocab_size=24, draft_accuracy=0.0, eos_rate=0.0)  # masks useless: only lookups can help
    store = _store_for(lm, _prompts(1, 30), 60, junk=20)
    forwards = {}
    for use in (False, True):
        total = 0
        for prompt in _prompts(2, 8):
            for batch in ([prompt], [prompt, prompt[::-1]]):
                results = Decoder(lm, batch, DecodeSettings(max_new_tokens=50, draft_store=use, **settings),
                                  draft_store=store).run()
                for p, result in zip(batch, results):
                    assert result.token_ids == lm.greedy(p, 50), (use, settings)
                total += results[0].forwards
        forwards[use] = total
    assert forwards[True] < 0.8 * forwards[False], forwards  # the store drafts, and they are kept


def test_prompt_lookup_off_turns_the_store_off_too():
    """``prompt_lookup_num_tokens`` is the lookup drafts' length, for both lookups: 0 is none."""
    lm = ToyLM(vocab_size=24, draft_accuracy=0.0, eos_rate=0.0)
    store = _store_for(lm, _prompts(1, 30), 60)
    prompt = _prompts(2, 1)[0]
    settings = DecodeSettings(max_new_tokens=40, k_min=4, k_max=4, prompt_lookup_num_tokens=0)
    with_store = Decoder(lm, [prompt], settings, draft_store=store).run()[0]
    without = Decoder(lm, [prompt], settings).run()[0]
    assert with_store.forwards == without.forwards and with_store.proposed["lookup"] == 0


def test_sampled_store_drafts_keep_the_exact_ar_distribution():
    """Store drafts are point masses (accepted with probability p(x)): 20,000 seeded decodes
    match the enumerated AR distribution, and the store's drafts are both kept and refused."""
    lm = SamplingToyLM()
    cells, probs = joint(lm, **SAMPLING)
    # the toy's likeliest continuations, and some it rarely emits, after every context
    replies = [[int(t) for t in np.random.default_rng(s).integers(0, lm.vocab_size, size=30)] for s in range(40)]
    store = DraftStore(pack_replies(replies))
    decoder_class = functools.partial(Decoder, draft_store=store)
    counts, decoder = decode_counts(lm, cells, decoder_class=decoder_class, k_min=3, k_max=3, threshold=1.0,
                                    prompt_lookup_num_tokens=2)
    assert_matches("store drafts", counts, probs)
    proposed = sum(r.proposed["lookup"] for r in decoder.results)
    accepted = sum(r.accepted["lookup"] for r in decoder.results)
    assert 0 < accepted < proposed


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled: code ran",))


@pytest.mark.parametrize("content, needle", [
    (b"not a zip", "not a usable draft store"),
    (_npz(tokens=np.array([_Boom()], dtype=object)), "not a usable draft store"),
    (_npz(ids=np.array([1, 2], dtype=np.uint16)), "expected one array 'tokens'"),
    (_npz(tokens=np.array([1, 2], dtype=np.int64)), "uint16 or uint32"),
    (_npz(tokens=np.zeros((2, 2), dtype=np.uint16)), "1-d array"),
    (_npz(tokens=np.array([1, 9_999, 65_535], dtype=np.uint16)), "outside the model's vocabulary"),
])
def test_a_bad_store_file_is_one_error_line(tiny_model_dir, tmp_path, capfd, content, needle):
    path = tmp_path / FILENAME
    path.write_bytes(content)
    with pytest.raises(FluidError, match=needle):
        load_draft_store(path, vocab_size=1_000)
    assert "code ran" not in capfd.readouterr().out  # np.load never unpickles
    model = tmp_path / "m"
    import shutil

    shutil.copytree(tiny_model_dir("llama"), model)
    from fluid_app.fluid_config import FluidConfig

    FluidConfig().save(model)
    (model / FILENAME).write_bytes(content)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    if "vocabulary" in needle:  # ids the tiny model lacks
        (model / FILENAME).write_bytes(_npz(tokens=np.array([1, vocab + 3, 65_535], dtype=np.uint16)))
    proc = run_cli("generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2")
    assert_one_line_error(proc, needle, "fluid export --draft-store")
    assert "code ran" not in proc.stdout + proc.stderr


def test_export_builds_copies_and_refuses_a_store(adapter_ckpt, tmp_path):
    """``fluid export --draft-store`` tokenises the replies of a chat JSONL into the store the
    loaded model then drafts from; a plain export copies it; ``--merge`` refuses the flag."""
    replies = tmp_path / "replies.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": "the same words again and again " * 3}]} for i in range(4)]
    replies.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "with-store"
    result = run_cli("export", str(adapter_ckpt), str(out), "--draft-store", str(replies))
    assert result.returncode == 0, result.stderr
    import fluid_app

    model = fluid_app.load(str(out), backend="torch", device="cpu", dtype="float32")
    expected = model.tokenizer.encode("the same words again and again " * 3, add_special_tokens=False)
    assert len(model.draft_store) == 4 * (len(expected) + 1)
    assert model.draft_store.continuation(expected[:NGRAM], 3) == expected[NGRAM:NGRAM + 3]
    copied = tmp_path / "copied"
    assert run_cli("export", str(out), str(copied)).returncode == 0
    assert (copied / FILENAME).read_bytes() == (out / FILENAME).read_bytes()
    result = run_cli("export", str(adapter_ckpt), str(tmp_path / "m"), "--merge", "--draft-store", str(replies))
    assert_one_line_error(result, "drop --merge")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    result = run_cli("export", str(adapter_ckpt), str(tmp_path / "e"), "--draft-store", str(empty))
    assert_one_line_error(result, "no assistant replies")
    assert not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def adapter_ckpt(tiny_model_dir, tmp_path_factory):
    from checkpoints import make_adapter_checkpoint

    return make_adapter_checkpoint(tiny_model_dir("llama"), tmp_path_factory.mktemp("ckpt") / "adapter")


def test_the_default_ships_a_store_that_drafts_and_stays_lossless(smollm2):
    """The embedded default's store (its base model's replies to 10,240 training prompts) loads,
    drafts tokens that are kept, and greedy FLUID with it still equals AR token for token."""
    assert smollm2.draft_store is not None and len(smollm2.draft_store) > 1_000_000
    with zipfile.ZipFile(smollm2.spec.draft_store_file) as archive:
        assert archive.namelist() == ["tokens.npy"]
    prompt = "Write a short thank-you note to a neighbor who watered my plants."
    ar = smollm2.generate(prompt, chat=True, mode="ar", max_new_tokens=48)
    runs = {use: smollm2.generate(prompt, chat=True, max_new_tokens=48, draft_store=use) for use in (False, True)}
    for run in runs.values():
        assert run.token_ids == ar.token_ids
    assert runs[True].drafts["lookup"]["accepted"] > runs[False].drafts["lookup"]["accepted"]
    assert runs[True].forwards < runs[False].forwards
