"""Stage I's held-out draft-quality curve (``--eval-every``): the figures against brute-force
oracles, and a real tiny run whose weights it must not change (CPU, real torch/peft)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import chat_file_fixture, read_log, stage1_options
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.torch_backend.training.evaluate import DraftEvaluator, block_outcomes, eval_layout, summarize
from backends.torch_backend.training.model import FluidLossModule, attach_lora
from backends.torch_backend.training.stage1 import run_stage1
from fluid_app.data import Example, build_examples, read_conversations
from fluid_app.errors import FluidError
from fluid_app.layout import IGNORE_INDEX

chat_file = chat_file_fixture(48)
MASK = 3
X = IGNORE_INDEX


# ------------------------------------------------------------ the figures, by hand


def _oracle(tokens: list[int], labels: list[int], k: int, draft) -> tuple[list[float | None], float, int]:
    """The definitions written out on the plain sequence: anchor ``a`` is every position whose
    next token is labelled; its slot ``i`` drafts ``x[a+i+1]`` with ``draft(a, i)`` and exists
    while ``x[a+1..a+i+1]`` are all labelled. P(slots 1..i all right) over the anchors that
    have slot ``i``, summed over ``i``."""
    n = len(tokens)
    present, correct, leading = [0] * k, [0] * k, [0] * k
    anchors = 0
    for a in range(n - 1):
        if labels[a + 1] == X:
            continue
        all_right, counted = True, False
        for i in range(1, k + 1):
            if a + i + 1 >= n or labels[a + i + 1] == X:
                break
            counted = True
            right = draft(a, i) == tokens[a + i + 1]
            all_right = all_right and right
            present[i - 1] += 1
            correct[i - 1] += right
            leading[i - 1] += all_right
        anchors += counted
    accuracy = [c / p if p else None for c, p in zip(correct, present)]
    return accuracy, sum(lead / p for lead, p in zip(leading, present) if p), anchors


def _drafts_from(layout, draft) -> np.ndarray:
    """What a model drafting ``draft(anchor, offset)`` at every mask slot would predict."""
    predicted = np.full(len(layout), -1)
    for slot in np.flatnonzero(layout.is_mask):
        anchor = int(layout.anchor_ids[slot])
        predicted[slot] = draft(anchor, int(layout.position_ids[slot]) - anchor)
    return predicted


def test_accuracy_and_accepted_run_match_a_brute_force_oracle():
    """A two-turn chat: prompt, a reply, a user turn, a short reply, and a trailing token, so
    blocks are cut by the end of a reply (not continued into the next one) and the anchor
    on a reply's last token has no slot at all."""
    tokens = list(range(100, 122))
    labels = [X] * 3 + tokens[3:12] + [X] * 2 + tokens[14:20] + [X] * 2  # a user turn shorter than a block
    k = 4

    def draft(anchor: int, offset: int) -> int:  # right unless anchor+offset hits a multiple of 3 or 7
        target = anchor + offset + 1
        return tokens[target] if target < len(tokens) and target % 3 and target % 7 else -7

    layout = eval_layout(Example(tokens, labels), MASK, k)
    assert layout.is_mask.sum() == k * sum(1 for a in range(len(tokens) - 1) if labels[a + 1] != X)
    assert not layout.restored.any()
    quality = summarize(block_outcomes(layout, _drafts_from(layout, draft)), k)
    accuracy, run, anchors = _oracle(tokens, labels, k, draft)
    assert quality.anchors == anchors == 8 + 5  # 9 + 6 anchors, less one per reply whose block has no label
    assert quality.accuracy == pytest.approx(accuracy)
    assert quality.mean_accepted_run == pytest.approx(run)
    marginal = sum(np.cumprod([a for a in accuracy if a is not None]))
    assert abs(quality.mean_accepted_run - marginal) > 0.05  # not a product of per-offset accuracies
    record = quality.record()
    assert (record["accuracy"], record["mean_accepted_run"], record["anchors"]) == \
        (pytest.approx(accuracy, abs=1e-6), pytest.approx(run, abs=1e-6), anchors)


def test_accepted_run_is_the_mean_leading_run_where_blocks_are_complete():
    outcomes = [[True, True, False], [True, False, True], [False, True, True], [True, True, True]]
    quality = summarize(outcomes, 3)
    assert quality.mean_accepted_run == pytest.approx(np.mean([2, 1, 0, 3]))
    assert quality.accuracy == pytest.approx([0.75, 0.75, 0.75])
    assert summarize([[], [True]], 3).accuracy == [1.0, None, None]


# ------------------------------------------------------------ the model's figures


def test_evaluator_drafts_what_a_causal_block_forward_drafts(tiny_model_dir, chat_file):
    """Each anchor's drafts, recomputed the way a decoder makes them: a plain causal forward
    (eval mode) of the prefix up to the anchor followed by K masks at the next positions.
    The evaluator, called on a module in train mode with LoRA dropout, must draft the same
    tokens at every slot in one batched pass of the strictly causal layout (padded rows),
    score them as the definitions say, and leave the mode and the RNG as they were."""
    folder = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = build_examples(read_conversations(str(chat_file), limit=3), tokenizer, max_len=96)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = attach_lora(plain, rank=4, alpha=8, dropout=0.5, mask_token_id=MASK, train_mask_embedding=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)  # a non-trivial adapter, whose dropout would show in train mode
    k = 3
    module = FluidLossModule(model).train()
    evaluator = DraftEvaluator(examples, mask_token_id=MASK, k=k, batch_size=2, pad_token_id=tokenizer.pad_token_id,
                               attn_kind="sdpa", device=torch.device("cpu"), bf16=False)
    state = torch.get_rng_state()
    drafts = evaluator.drafts(module)
    assert module.training and torch.equal(torch.get_rng_state(), state)
    model.eval()
    assert len({len(layout) for layout in evaluator.layouts}) > 1  # rows of different lengths: padding is used

    checked = 0
    for example, layout, predicted in zip(examples, evaluator.layouts, drafts):
        tokens, labels = example.input_ids, example.labels
        brute = {}
        for a in range(len(tokens) - 1):
            if labels[a + 1] != X:
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([tokens[:a + 1] + [MASK] * k])).logits[0, a + 1:]
                brute[a] = logits.argmax(-1).tolist()
        for slot in np.flatnonzero(layout.is_mask & (layout.labels != X)):
            anchor = int(layout.anchor_ids[slot])
            assert predicted[slot] == brute[anchor][int(layout.position_ids[slot]) - anchor - 1]
            checked += 1
        accuracy, run, anchors = _oracle(tokens, labels, k, lambda a, i, table=brute: table[a][i - 1])
        quality = summarize(block_outcomes(layout, predicted), k)
        assert (quality.accuracy, quality.mean_accepted_run, quality.anchors) == (accuracy, run, anchors)
    assert checked > 50


# ------------------------------------------------------------ in a training run


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_eval_every_logs_a_curve_and_changes_nothing_in_training(tiny_model_dir, chat_file, tmp_path):
    """With LoRA dropout on (so the RNG stream and train mode matter): the same weights and
    step records with the curve on or off, and with the curve on through a stop and resume."""
    base = tiny_model_dir("llama")
    common = dict(steps=6, lora_dropout=0.1, holdout=0.25, max_len=64)
    run_stage1(stage1_options(base, chat_file, tmp_path / "off", **common))
    summary = run_stage1(stage1_options(base, chat_file, tmp_path / "on", eval_every=4, eval_count=6, **common))
    split = tmp_path / "split"
    run_stage1(stage1_options(base, chat_file, split, eval_every=4, eval_count=6, stop_at_step=3, **common))
    run_stage1(stage1_options(base, chat_file, split, eval_every=4, eval_count=6, resume="auto", **common))

    off = _weights(tmp_path / "off")
    for name in ("on", "split"):
        weights = _weights(tmp_path / name)
        assert weights.keys() == off.keys() and all(torch.equal(weights[k], off[k]) for k in off), name
        steps = read_log(tmp_path / name)
        assert [(r["step"], r["loss"]) for r in steps] == [(r["step"], r["loss"]) for r in read_log(tmp_path / "off")]

    evals = read_log(tmp_path / "on", evals=True)
    assert [r["step"] for r in evals] == [4, 6]  # every 4 steps and at the end
    for record in evals:
        quality = record["eval"]
        assert set(quality) == {"accuracy", "mean_accepted_run", "anchors"}
        assert len(quality["accuracy"]) == 4 and all(0.0 <= a <= 1.0 for a in quality["accuracy"])
        assert 0.0 <= quality["mean_accepted_run"] <= 4 and quality["anchors"] > 50
    assert summary["eval"] == evals[-1]
    assert [(r["step"], "eval" in r) for r in read_log(split, evals=None)] == \
        [(1, False), (2, False), (3, False), (3, True), (4, False), (4, True), (5, False), (6, False), (6, True)]
    assert read_log(split, evals=True)[1:] == evals  # the resumed curve is the straight run's


def test_eval_needs_a_held_out_split(tiny_model_dir, chat_file, tmp_path, capsys):
    from fluid_app.cli import main

    base = tiny_model_dir("llama")
    capsys.readouterr()
    code = main(["train", "stage1", "--base", str(base), "--data", str(chat_file), "--out", str(tmp_path / "cli"),
                 "--eval-every", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.rstrip().endswith("(--eval-every, --holdout)"), err
    with pytest.raises(FluidError, match="set holdout") as error:
        run_stage1(stage1_options(base, chat_file, tmp_path / "a", eval_every=2))
    assert error.value.params == ("eval_every", "holdout")
    with pytest.raises(FluidError, match="held-out split of .* is empty"):
        run_stage1(stage1_options(base, chat_file, tmp_path / "b", eval_every=2, holdout=0.01))
    assert not (tmp_path / "b").exists()


def test_the_draft_quality_script_scores_a_finished_run_as_the_run_scored_itself(tiny_model_dir, chat_file, tmp_path):
    """``benchmarks/draft_quality.py`` on a run's exported folder: the same held-out anchors as
    the run's last ``--eval-every`` record and the same figures, up to the merged export's
    rounding; a missing data file is one ``error:`` line, exit 2."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    summary = run_stage1(stage1_options(tiny_model_dir("llama"), chat_file, out, steps=6, holdout=0.25, max_len=64,
                                        eval_every=6, eval_count=6, k_max=4, bf16=True))
    script = [sys.executable, str(root / "benchmarks" / "draft_quality.py"), "--model", str(out), "--holdout", "0.25",
              "--eval-count", "6", "--k-max", "4", "--max-len", "64"]
    proc = subprocess.run([*script, "--data", str(chat_file)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    scored, logged = json.loads(proc.stdout), summary["eval"]["eval"]
    assert scored["anchors"] == logged["anchors"] > 50 and len(scored["accuracy"]) == 4
    assert abs(scored["mean_accepted_run"] - logged["mean_accepted_run"]) < 0.05
    bad = subprocess.run([*script, "--data", str(tmp_path / "none.jsonl")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and bad.stderr.count("\n") == 1, bad.stderr
