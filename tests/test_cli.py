"""The CLI contract: JSON fields later tools rely on, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli

from fluid_app.bench import format_table
from fluid_app.machine import describe, machine_text


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
    assert report["backend"] == {"name": "torch", "device": "cpu", "dtype": "float32"}  # what ran, for the record
    assert report["machine"] == describe() and report["machine"]["cores"] >= 1  # and where
    table = run_cli("bench", "--model", str(tiny_model_dir("llama")), "--prompts", str(prompts), "--max-new-tokens", "4",
                    "--dtype", "bfloat16")
    assert "speedup=" in table.stdout and "fluid" in table.stdout
    assert table.stdout.splitlines()[0] == f"torch on cpu, bfloat16; {machine_text(describe())}"


def test_bench_prints_the_table_and_writes_the_report_from_one_run(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Paris is", "Once upon"]) + "\n")
    report = tmp_path / "report.json"
    proc = run_cli("bench", "--model", str(tiny_model_dir("llama")), "--prompts", str(prompts), "--max-new-tokens", "6",
                   "--modes", "ar,fluid", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(report.read_text())
    assert proc.stdout.strip() == format_table(saved)  # the table printed is the report written: one run
    assert saved["identical"] is True and saved["machine"] == describe()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["prompts.jsonl", "report.json"]  # no temp file left


def test_bench_runs_fixed_horizons_and_draws_the_plot(tiny_model_dir, tmp_path):
    from PIL import Image

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Paris is", "Once upon"]) + "\n")
    plot = tmp_path / "bench.png"
    proc = run_cli("bench", "--model", str(tiny_model_dir("llama")), "--prompts", str(prompts), "--max-new-tokens", "12",
                   "--k-min", "2", "--k-max", "5", "--horizons", "k-head,k-max,k-min", "--plot", str(plot), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["modes"]) == {"ar", "reference", "fluid", "fluid k=5", "fluid k=2"}
    assert set(report["fixed_horizons"]) == {"fluid k=5", "fluid k=2"}
    assert all(v["mismatches"] == 0 for v in report["fixed_horizons"].values())
    assert report["horizons"]["fluid k=5"][0] == 5 and max(report["horizons"]["fluid k=5"]) == 5
    assert max(report["horizons"]["fluid k=2"]) == 2
    assert len(report["per_prompt_tpf"]["fluid k=2"]) == 2
    umask = os.umask(0)
    os.umask(umask)
    assert plot.stat().st_mode & 0o777 == 0o666 & ~umask  # the modes open() gives, not mkstemp's
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 200
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".bench.png")]  # no temp file left


def test_bench_variants_run_fluid_with_their_options(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Paris is", "Once upon", "def add"]) + "\n")
    proc = run_cli("bench", "--model", str(tiny_model_dir("llama")), "--prompts", str(prompts), "--max-new-tokens", "12",
                   "--modes", "ar,fluid", "--k-min", "3", "--k-max", "6", "--variant", "k_min=2, k_max=2",
                   "--variant", "threshold=0.5,prompt_lookup_num_tokens=0,draft_store=false", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    two, other = "fluid k_min=2,k_max=2", "fluid threshold=0.5,prompt_lookup_num_tokens=0,draft_store=false"
    assert set(report["modes"]) == {"ar", "fluid", two, other}
    assert set(report["fixed_horizons"]) == {two, other}
    assert all(v["mismatches"] == 0 and v["speedup"] > 0 for v in report["fixed_horizons"].values())
    assert max(report["horizons"][two]) == 2 and max(report["horizons"]["fluid"]) > 2
    assert report["drafts"][other]["lookup"]["proposed"] == 0
    only_ar = run_cli("bench", "--model", str(tiny_model_dir("llama")), "--prompts", str(prompts), "--max-new-tokens",
                      "6", "--modes", "ar", "--variant", "k_min=2,k_max=2", "--json")
    assert only_ar.returncode == 0, only_ar.stderr  # a variant is a FLUID run whatever --modes names
    assert set(json.loads(only_ar.stdout)["fixed_horizons"]) == {two}


def test_bench_runs_take_turns_first(tiny_model_dir):
    """Each run goes first on some prompt, so a machine's drift does not favour one of them."""
    import fluid_app
    from fluid_app.bench import run_bench

    model = fluid_app.load(str(tiny_model_dir("llama")))
    calls: list[tuple[str, object]] = []
    generate = model.generate

    def recording(prompt, **options):
        if options.get("max_new_tokens") != 8:  # not the warm-up
            calls.append((prompt, (options["mode"], options.get("k_min"))))
        return generate(prompt, **options)

    model.generate = recording
    prompts = ["Paris is", "Once upon", "def add"]
    run_bench(model, prompts, modes=("ar", "fluid"), variants=[{"k_min": 2, "k_max": 2}], max_new_tokens=6)
    firsts = [calls[3 * i][1] for i in range(3)]
    assert [c[0] for c in calls] == [p for p in prompts for _ in range(3)]
    assert sorted(firsts, key=str) == sorted([("ar", None), ("fluid", None), ("fluid", 2)], key=str)


def test_bench_rejects_a_bad_plot_path_or_horizon_before_loading():
    for extra, needle in ((["--plot", "out.txt"], "ending in .png"), (["--plot", "/no/such/dir/x.png"], "does not exist"),
                          (["--report", "out.txt"], "ending in .json"),
                          (["--report", "/no/such/dir/r.json"], "does not exist"),
                          (["--report", "/tmp"], "ending in .json"),
                          (["--horizons", "k-head,longest"], "unknown horizon policy 'longest'"),
                          (["--variant", "k_min"], "bad variant 'k_min'"),
                          (["--variant", "temperature=1"], "keys from k_min, k_max, threshold"),
                          (["--variant", "threshold=high"], "'high' is not a number or true/false")):
        proc = run_cli("bench", "--model", "/no/such/model", "--prompts", "benchmarks/sharegpt_heldout_10.jsonl", *extra)
        assert_one_line_error(proc, needle)


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
    proc = run_cli("bench", "--model", model, "--prompts", "benchmarks/sharegpt_heldout_10.jsonl",
                   "--variant", "threshold=2")
    assert_one_line_error(proc, "variant 'threshold=2': threshold", "(0, 1]", "(--variant)")


def test_config_file_expands_to_flags_and_typed_flags_win(tmp_path):
    from fluid_app.errors import FluidError
    from fluid_app.option_files import expand_config

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"_comment": "skipped", "base": "default", "k_max": 8, "bf16": True,
                                  "fsdp": False, "lr": 0.0003}))
    argv = expand_config(["train", "stage1", "--steps", "5", "--config", str(recipe), "--k-max", "4"])
    assert argv == ["train", "stage1", "--base", "default", "--k-max", "8", "--bf16", "--lr", "0.0003",
                    "--steps", "5", "--k-max", "4"]
    from fluid_app.cli import build_parser

    args = build_parser().parse_args(argv + ["--data", "d.jsonl", "--out", "o"])
    assert (args.k_max, args.bf16, args.lr, args.steps) == (4, True, 0.0003, 5)  # the typed --k-max wins
    recipe.write_text("[1, 2]")
    with pytest.raises(FluidError, match="one JSON object"):
        expand_config(["train", "stage1", "--config", str(recipe)])
    proc = run_cli("train", "stage1", "--config", str(tmp_path / "missing.json"))
    assert_one_line_error(proc, "config file", "not found")


def test_a_chat_history_may_end_with_any_role_but_not_be_blank(tmp_path):
    """As in the OpenAI API, a history may end with an assistant turn (the model writes the next
    one); a blank or malformed history is refused before any model loads."""
    from fluid_app.api import check_messages
    from fluid_app.errors import FluidError

    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}]
    assert check_messages(history) == history
    for bad, needle in [([], "non-empty list"), ([{"role": "user", "content": "  "}], "history is empty"),
                        ([{"role": "bot", "content": "x"}], "role one of"),
                        ([{"role": "user", "content": 3}], "text content")]:
        with pytest.raises(FluidError, match=needle):
            check_messages(bad)
    path = tmp_path / "blank.json"
    path.write_text('[{"role": "user", "content": " "}]')
    assert_one_line_error(run_cli("generate", "--model", "/no/such/model", "--messages", str(path)),
                          "history is empty")


def test_the_command_ends_at_once_after_exit_handlers_and_flushed_output(tiny_model_dir, tmp_path):
    """``fluid`` skips Python's slow module teardown (``os._exit``), but only after the exit
    handlers have run and the output is flushed: a piped ``--json`` arrives whole."""
    import subprocess
    import sys
    import textwrap

    from conftest import ROOT

    marker = tmp_path / "handler-ran"
    script = textwrap.dedent(f"""
        import atexit, sys
        atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
        sys.argv = ["fluid", "generate", "--model", {str(tiny_model_dir("llama"))!r}, "--prompt", "Paris is",
                    "--max-new-tokens", "5", "--json"]
        from fluid_app.cli import run
        run()
        print("run() returned")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's output is buffered
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(env, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["new_tokens"] == 5 and "run() returned" not in done.stdout
    assert marker.read_text() == "yes"
