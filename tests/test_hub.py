"""Hub round trips with the real ``huggingface_hub`` client against a loopback Hub server
(tests/hub_server.py), offline use of the cache, the authors' release layout, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import make_adapter_checkpoint
from conftest import run_cli
from hub_server import HubServer
from transformers import AutoModelForCausalLM, AutoTokenizer

import fluid_app

PROMPT = "The quick brown fox"
N = 16
TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        server.state.require_token = TOKEN
        yield server


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """Environment of a user pointed at the test Hub with an empty cache and a token."""
    cache = tmp_path / "hf-home"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return cache


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def fails(result, *needles):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def generate_cli(model: str) -> list[int]:
    result = ok(run_cli("generate", "--model", model, "--prompt", PROMPT, "--json", "--backend", "torch",
                        "--device", "cpu", "--dtype", "float32", "--max-new-tokens", str(N)))
    return json.loads(result.stdout)["token_ids"]


def local_ids(folder, mode="fluid") -> list[int]:
    model = fluid_app.load(str(folder), backend="torch", device="cpu", dtype="float32")
    return model.generate(PROMPT, mode=mode, max_new_tokens=N).token_ids


def latest_files(hub: HubServer, repo_id: str, ref: str = "main") -> dict[str, bytes]:
    repo = hub.state.repos[repo_id]
    return repo.commits[repo.refs[ref]]


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """The original adapter checkpoint (base = local folder) and a copy naming its base by Hub id."""
    root = tmp_path_factory.mktemp("hub-ckpt")
    original = make_adapter_checkpoint(tiny_model_dir("llama"), root / "original")
    publish = root / "publish"
    shutil.copytree(original, publish)
    bench = {"prompts": 2, "speedup": 1.31, "identical": True,
             "modes": {"ar": {"tokens": 32, "forwards": 32, "tokens_per_s": 100.0, "tokens_per_forward": 1.0},
                       "fluid": {"tokens": 32, "forwards": 20, "tokens_per_s": 131.0, "tokens_per_forward": 1.6}}}
    (publish / "bench.json").write_text(json.dumps(bench))
    return original, publish


def test_push_pull_generate_matches_original(hub, online, checkpoints, tiny_model_dir, monkeypatch):
    original, publish = checkpoints
    base = tiny_model_dir("llama")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    ok(run_cli("push", str(base), "org/tiny-base", "--keep-readme"))
    # the adapter's base is a local folder: pushing it as is would publish an unloadable repo
    fails(run_cli("push", str(publish), "org/tiny-fluid"), "--base-model", "fluid export")
    assert "org/tiny-fluid" not in hub.state.repos
    ok(run_cli("push", str(publish), "org/tiny-fluid", "--private", "--base-model", "org/tiny-base"))
    assert hub.state.repos["org/tiny-fluid"].private
    files = latest_files(hub, "org/tiny-fluid")
    assert {"adapter_config.json", "adapter_model.safetensors", "fluid_config.json", "k_head.safetensors",
            "bench.json", "README.md"} <= set(files)
    assert json.loads(files["fluid_config.json"])["base_model"] == "org/tiny-base"
    assert json.loads((publish / "fluid_config.json").read_text())["base_model"] == str(base)  # untouched
    card = files["README.md"].decode()
    for needle in ("base_model: org/tiny-base", "license: mit", "| fluid | 32 | 20 | 131.0 | 1.6 |",
                   "fluid pull org/tiny-fluid", "--backend mlx", '"lora_r": 4'):
        assert needle in card, needle

    pulled = ok(run_cli("pull", "org/tiny-fluid"))
    folder = Path(pulled.stdout.strip().splitlines()[-1])
    assert folder.is_relative_to(online) and (folder / "adapter_model.safetensors").exists()
    assert (online / "hub" / "models--org--tiny-base").is_dir(), "the base model named by the adapter was not pulled"

    expected = local_ids(original)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything now comes from the cache
    assert generate_cli("org/tiny-fluid") == expected
    assert expected == local_ids(original, mode="ar")  # and it is lossless

    # a plain causal LM from the Hub: AR-only notice, both modes still work
    result = ok(run_cli("generate", "--model", "org/tiny-base", "--prompt", PROMPT, "--mode", "ar",
                        "--max-new-tokens", "4", "--backend", "torch"))
    assert "has no FLUID adapter" in result.stderr and "fluid train stage1" in result.stderr


def test_push_to_branch_and_pull_revision(hub, online, tiny_model_dir, tmp_path, monkeypatch):
    ok(run_cli("push", str(tiny_model_dir("llama")), "org/branchy", "--revision", "dev"))
    assert "config.json" in latest_files(hub, "org/branchy", "dev")
    assert "config.json" not in latest_files(hub, "org/branchy", "main")
    local = tmp_path / "local"
    out = ok(run_cli("pull", "org/branchy", "--revision", "dev", "--local-dir", str(local)))
    assert Path(out.stdout.strip().splitlines()[-1]) == local.resolve()
    assert (local / "model.safetensors").read_bytes() == (tiny_model_dir("llama") / "model.safetensors").read_bytes()
    assert not (online / "hub" / "models--org--branchy").joinpath("snapshots").exists()
    # into the cache, then --model owner/name@revision finds it offline
    ok(run_cli("pull", "org/branchy", "--revision", "dev"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(run_cli("generate", "--model", "org/branchy", "--prompt", PROMPT), "fluid pull org/branchy")
    result = ok(run_cli("generate", "--model", "org/branchy@dev", "--prompt", PROMPT, "--mode", "ar", "--json",
                        "--backend", "torch", "--device", "cpu", "--max-new-tokens", str(N)))
    assert json.loads(result.stdout)["token_ids"] == local_ids(tiny_model_dir("llama"), mode="ar")


def test_offline_never_pulled_names_repo_and_fix(online, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(run_cli("generate", "--model", "org/never-pulled", "--prompt", "hi", "--backend", "torch"),
          "org/never-pulled", "fluid pull org/never-pulled", "HF_HUB_OFFLINE")
    fails(run_cli("pull", "org/never-pulled"), "fluid pull org/never-pulled")


def test_bad_input_gives_one_line_errors(hub, online, tiny_model_dir, tmp_path, monkeypatch):
    fails(run_cli("pull", "not a repo id"), "owner/name")
    fails(run_cli("pull", "org/does-not-exist"), "org/does-not-exist", "not found", "HF_TOKEN")
    ok(run_cli("push", str(tiny_model_dir("llama")), "org/plain"))
    fails(run_cli("pull", "org/plain", "--revision", "no-such-branch"), "no-such-branch", "--revision")
    fails(run_cli("push", str(tmp_path / "missing"), "org/x"), "not a folder")
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    fails(run_cli("pull", "org/plain"), "cannot reach", "HF_ENDPOINT", "fluid pull org/plain")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)

    # a repo that has weights but no tokenizer
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir("llama") / name, weights_only / name)
    hub.state.seed("org/no-tokenizer", weights_only)
    fails(run_cli("pull", "org/no-tokenizer"), "org/no-tokenizer", "no tokenizer")

    # a private repo without a token
    hub.state.seed("org/secret", tiny_model_dir("llama"), private=True)
    monkeypatch.delenv("HF_TOKEN")
    fails(run_cli("pull", "org/secret"), "org/secret", "HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    ok(run_cli("pull", "org/secret"))


def test_interrupted_downloads_resume_and_are_never_used_half_written(hub, online, tiny_model_dir, monkeypatch):
    base = tiny_model_dir("llama")
    weights = (base / "model.safetensors").read_bytes()

    # the connection drops mid-file once: the client resumes with a Range request from what it
    # had written (it writes in 10 MiB chunks, so the file must be larger than one chunk)
    big = tiny_model_dir("llama").parent / "with-big-file"
    if not big.exists():
        shutil.copytree(base, big)
        (big / "extra.safetensors").write_bytes(bytes(range(256)) * (12 * 4096))  # 12 MiB
    payload = (big / "extra.safetensors").read_bytes()
    hub.state.seed("org/flaky", big)
    hub.state.drop_once["extra.safetensors"] = 11 * 2**20
    before = len(hub.state.requests)
    folder = Path(ok(run_cli("pull", "org/flaky")).stdout.strip().splitlines()[-1])
    gets = [r for m, p, r in hub.state.requests[before:] if p.endswith("/extra.safetensors") and m == "GET"]
    assert gets == [None, f"bytes={10 * 2**20}-"]
    assert hashlib.sha256((folder / "extra.safetensors").read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert (folder / "model.safetensors").read_bytes() == weights

    # a download that fails outright: clear error, and the partial snapshot is refused offline
    ok(run_cli("push", str(base), "org/flaky2"))
    hub.state.fail_once["model.safetensors"] = 500
    fails(run_cli("pull", "org/flaky2"), "org/flaky2", "fluid pull org/flaky2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(run_cli("generate", "--model", "org/flaky2", "--prompt", "hi", "--backend", "torch"),
          "partly downloaded", "fluid pull org/flaky2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    ok(run_cli("pull", "org/flaky2"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert generate_cli("org/flaky2") == local_ids(base, mode="ar")


# ------------------------------------------------------------------ authors' layout

def _reference_layout(tiny_dir: Path, out: Path, mask_in_config: bool = True) -> tuple[Path, dict]:
    """A tiny model saved like the authors' release: merged HF folder + model_head.bin."""
    shutil.copytree(tiny_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    config = json.loads((out / "config.json").read_text())
    if mask_in_config:
        config["mask_token_id"] = int(tokenizer.convert_tokens_to_ids("<|unused|>"))
    (out / "config.json").write_text(json.dumps(config))
    h = config["hidden_size"]
    torch.manual_seed(3)
    head = {  # nn.Sequential(Linear(h, h/4), GELU(), Linear(h/4, 16)) under the authors' prefix
        "diffusion_k_head.0.weight": torch.randn(h // 4, h), "diffusion_k_head.0.bias": torch.randn(h // 4),
        "diffusion_k_head.2.weight": torch.randn(16, h // 4), "diffusion_k_head.2.bias": torch.randn(16),
    }
    torch.save(head, out / "model_head.bin")
    return out, head


def test_import_reference_layout_decodes_losslessly(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    src, head = _reference_layout(tiny_model_dir("llama"), tmp_path / "release")
    out = tmp_path / "imported"
    ok(run_cli("import-reference", str(src), str(out)))
    k_head = load_file(str(out / "k_head.safetensors"))
    # h/4 == K == 16 here, so only the key order can tell the biases apart
    assert torch.equal(k_head["proj.weight"], head["diffusion_k_head.0.weight"])
    assert torch.equal(k_head["proj.bias"], head["diffusion_k_head.0.bias"])
    assert torch.equal(k_head["out.weight"], head["diffusion_k_head.2.weight"])
    assert torch.equal(k_head["out.bias"], head["diffusion_k_head.2.bias"])
    fluid_cfg = json.loads((out / "fluid_config.json").read_text())
    assert fluid_cfg["mask_token_id"] == json.loads((src / "config.json").read_text())["mask_token_id"]
    assert fluid_cfg["k_max"] == 16

    fluid_ids = local_ids(out)
    assert fluid_ids == local_ids(out, mode="ar")
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    hf = model.generate(ids, max_new_tokens=len(fluid_ids), do_sample=False, eos_token_id=None,
                        pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert hf == fluid_ids


def test_reference_k_head_is_mapped_by_shape_not_name(tmp_path):
    """Other key names and h/4 != K: the tensors still land in the right places."""
    from backends.torch_backend.reference import k_head_from_reference
    from fluid_app.errors import FluidError

    h, k = 32, 6
    head = {"diffusion_k_head.fc_out.bias": torch.randn(k), "diffusion_k_head.fc_out.weight": torch.randn(k, h // 4),
            "diffusion_k_head.fc_in.weight": torch.randn(h // 4, h), "diffusion_k_head.fc_in.bias": torch.randn(h // 4),
            "something_else.weight": torch.randn(3, 3)}
    torch.save(head, tmp_path / "model_head.bin")
    module = k_head_from_reference(tmp_path / "model_head.bin", h)
    assert module.k_max == k
    assert torch.equal(module.proj.weight, head["diffusion_k_head.fc_in.weight"])
    assert torch.equal(module.proj.bias, head["diffusion_k_head.fc_in.bias"])
    assert torch.equal(module.out.weight, head["diffusion_k_head.fc_out.weight"])
    assert torch.equal(module.out.bias, head["diffusion_k_head.fc_out.bias"])
    with pytest.raises(FluidError, match="hidden|fit"):
        k_head_from_reference(tmp_path / "model_head.bin", 64)  # wrong model for this head
    (tmp_path / "bad.bin").write_bytes(b"not a pickle")
    with pytest.raises(FluidError, match="re-download"):
        k_head_from_reference(tmp_path / "bad.bin", h)


def test_import_reference_needs_mask_id(tiny_model_dir, tmp_path):
    src, _ = _reference_layout(tiny_model_dir("llama"), tmp_path / "release", mask_in_config=False)
    fails(run_cli("import-reference", str(src), str(tmp_path / "out")), "--mask-token-id")
    assert not (tmp_path / "out").exists()
    fails(run_cli("import-reference", str(tiny_model_dir("llama")), str(tmp_path / "out")), "model_head.bin")
    unused = AutoTokenizer.from_pretrained(str(src)).convert_tokens_to_ids("<|unused|>")
    ok(run_cli("import-reference", str(src), str(tmp_path / "out"), "--mask-token-id", str(unused),
               "--verify-tokens", "0"))
    assert json.loads((tmp_path / "out" / "fluid_config.json").read_text())["mask_token_id"] == unused


# ------------------------------------------------------------------ what a push publishes

def _training_run(tiny_model_dir, root: Path) -> tuple[Path, Path]:
    """A Stage I output folder as training leaves it: the export, plus resumable state, logs
    and the peft README; its configs name this machine's paths in several places."""
    base = tiny_model_dir("llama")
    run = make_adapter_checkpoint(base, root / "run")
    config = json.loads((run / "fluid_config.json").read_text())
    config["extra"] = {
        "stage1": {"base": str(base), "base_model": str(base), "data": "/home/trainer/data/chats.jsonl",
                   "lora_rank": 4, "notes": f"trained from {base}/ on /home/trainer/data/chats.jsonl"},
        "stage2": {"model": str(run), "data": "/home/trainer/data/chats.jsonl", "steps": 3,
                   "history": [{"cmd": f"fluid train stage2 --model {run} --out ~/runs/s2"}]},
        "original_base_model": str(base),
    }
    (run / "fluid_config.json").write_text(json.dumps(config))
    step = run / "checkpoints" / "step-0000010"
    step.mkdir(parents=True)
    for name in ("optimizer.pt", "rng-rank0.pt", "trainer_state.json", "trainable.safetensors",
                 "optimizer.safetensors", "optimizer.json", "rng-rank0.json"):
        (step / name).write_bytes(b"state")
    for name in ("adapter_config.json", "adapter_model.safetensors", "fluid_config.json"):
        shutil.copy(run / name, step / name)
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 3.2}\n')
    (run / "stage2_log.jsonl").write_text('{"step": 1}\n')
    (run / "notes.txt").write_text("scratch\n")
    (run / "docs").mkdir()
    (run / "docs" / "curve.png").write_bytes(b"\x89PNG")
    (run / "README.md").write_text(f"---\nbase_model: {base}\nlibrary_name: peft\n---\n# Model Card\n")
    return run, base


def test_push_uploads_the_shippable_files_only(hub, online, tiny_model_dir, tmp_path):
    run, _ = _training_run(tiny_model_dir, tmp_path)
    result = ok(run_cli("push", str(run), "org/run", "--base-model", "org/tiny-base"))
    shipped = {"adapter_config.json", "adapter_model.safetensors", "fluid_config.json", "k_head.safetensors",
               "README.md"}
    assert set(latest_files(hub, "org/run")) == shipped
    assert "not uploaded" in result.stderr and "checkpoints/" in result.stderr and "train_log.jsonl" in result.stderr
    ok(run_cli("push", str(run), "org/run-docs", "--base-model", "org/tiny-base", "--include", "docs/*.png",
               "--include", "notes.txt"))
    assert set(latest_files(hub, "org/run-docs")) == shipped | {"docs/curve.png", "notes.txt"}
    # an include that adds nothing publishable is a mistake (training state never goes up)
    for pattern in ("checkpoints/*", "*.pt", "docs/*.jpg"):
        fails(run_cli("push", str(run), "org/run-x", "--base-model", "org/tiny-base", "--include", pattern),
              "--include", pattern)
    assert "org/run-x" not in hub.state.repos


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def test_published_configs_and_card_hold_no_local_paths(hub, online, tiny_model_dir, tmp_path):
    run, base = _training_run(tiny_model_dir, tmp_path)
    ok(run_cli("push", str(run), "org/portable", "--base-model", "org/tiny-base"))
    files = latest_files(hub, "org/portable")
    local = (str(base), str(run), str(tmp_path), "/home/trainer", "~/runs")
    for name, data in files.items():
        if name.endswith((".json", ".md")):
            text = data.decode()
            assert not any(path in text for path in local), (name, text)
    config = json.loads(files["fluid_config.json"])
    assert config["base_model"] == "org/tiny-base"
    stage1, stage2 = config["extra"]["stage1"], config["extra"]["stage2"]
    assert stage1["base"] == stage1["base_model"] == config["extra"]["original_base_model"] == "org/tiny-base"
    assert stage1["data"] == stage2["data"] == "chats.jsonl" and stage2["model"] == run.name
    assert stage1["notes"] == "trained from org/tiny-base on chats.jsonl"
    assert stage2["history"][0]["cmd"] == f"fluid train stage2 --model {run.name} --out s2"
    assert not [s for s in _strings(config) if s.startswith(("/", "~"))]
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-base"
    card = files["README.md"].decode()
    assert "base_model: org/tiny-base" in card and '"data": "chats.jsonl"' in card
    # what stays on this machine is untouched
    assert json.loads((run / "fluid_config.json").read_text())["extra"]["stage1"]["data"].startswith("/home/")
    # the folder's own card, kept on request, is uploaded with its paths made portable too
    ok(run_cli("push", str(run), "org/portable-card", "--base-model", "org/tiny-base", "--keep-readme"))
    card = latest_files(hub, "org/portable-card")["README.md"].decode()
    assert card == "---\nbase_model: org/tiny-base\nlibrary_name: peft\n---\n# Model Card\n", card
    (run / "README.md").write_bytes(b"# caf\xe9\n")  # not UTF-8: refused, not uploaded as bytes
    fails(run_cli("push", str(run), "org/latin1-card", "--base-model", "org/tiny-base", "--keep-readme"),
          "README.md is not UTF-8 text", "--keep-readme")
    assert "org/latin1-card" not in hub.state.repos
