"""The CLI contract: JSON fields later tools rely on, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for needle in needles:
        assert needle in last


def test_generate_json_has_the_documented_fields(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    proc = run_cli("generate", "--model", model, "--prompt", "The quick brown", "--max-new-tokens", "12",
                   "--k-min", "2", "--k-max", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("text", "token_ids", "new_tokens", "forwards", "tokens_per_forward", "seconds", "tokens_per_s", "blocks"):
        assert key in out
    assert out["new_tokens"] == len(out["token_ids"]) <= 12
    assert all(set(block) == {"k", "accepted"} for block in out["blocks"])
    ar = json.loads(run_cli("generate", "--model", model, "--prompt", "The quick brown", "--max-new-tokens", "12",
                            "--mode", "ar", "--json").stdout)
    assert ar["token_ids"] == out["token_ids"]


def test_bench_reports_every_mode_and_the_comparisons(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Paris is", "Once upon", "def add"]) + "\n")
    proc = run_cli("bench", "--model", str(tiny_model_dir("llama")), "--prompts", str(prompts),
                   "--max-new-tokens", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for mode in ("ar", "reference", "fluid"):
        assert set(report["modes"][mode]) >= {"tokens", "forwards", "seconds", "tokens_per_s", "tokens_per_forward"}
    assert report["identical"] is True and report["mismatches"] == 0
    assert {"speedup", "speedup_vs_reference"} <= set(report)
    table = run_cli("bench", "--model", str(tiny_model_dir("llama")), "--prompts", str(prompts), "--max-new-tokens", "4")
    assert "speedup=" in table.stdout and "fluid" in table.stdout


@pytest.mark.parametrize("args, needles", [
    (["--prompt", "  "], ["prompt is empty"]),
    (["--prompt", "hi", "--k-min", "6", "--k-max", "2"], ["k_min (6) is larger than k_max (2)", "--k-min"]),
    (["--prompt", "hi", "--threshold", "0"], ["threshold", "(0, 1]"]),
    (["--prompt", "hi", "--threshold", "1.5"], ["threshold", "(0, 1]"]),
    (["--prompt", "hi", "--model", "/no/such/model"], ["not found", "--model" if False else "pass"]),
])
def test_bad_input_is_one_line_with_exit_code_2(args, needles):
    proc = run_cli("generate", *(args if "--model" in args else ["--model", "/no/such/model", *args]))
    assert_one_line_error(proc, *needles)


def test_bad_input_that_needs_the_model(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    proc = run_cli("generate", "--model", model, "--prompt", "fox " * 600)
    assert_one_line_error(proc, "context", "shorten the prompt")
    proc = run_cli("generate", "--model", model, "--prompt", "hi", "--mask-token-id", "100000")
    assert_one_line_error(proc, "outside the vocabulary")
    proc = run_cli("bench", "--model", model, "--prompts", "/no/prompts.jsonl")
    assert_one_line_error(proc, "not found")
