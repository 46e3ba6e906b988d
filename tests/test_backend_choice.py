"""``--backend auto`` says which backend it chose and why; a Mac install gets MLX."""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import ROOT, run_cli

import backends


def test_auto_names_its_choice_in_one_stderr_line_even_with_json(tiny_model_dir):
    proc = run_cli("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "Paris is", "--max-new-tokens", "2",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)  # standard output stays pure JSON
    said = [line for line in proc.stderr.splitlines() if line.startswith("backend: ")]
    assert len(said) == 1 and re.fullmatch(r"backend: (torch|mlx) \(.+\)", said[0]), proc.stderr


def test_auto_picks_mlx_on_apple_silicon_and_names_the_extra_when_it_is_missing(monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine picks CUDA")
    monkeypatch.setattr(backends.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(backends.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(backends, "_installed", lambda module: True)
    assert backends.pick_backend("auto") == ("mlx", "Apple Silicon with mlx-lm installed")
    monkeypatch.setattr(backends, "_installed", lambda module: module == "torch")
    chosen, reason = backends.pick_backend("auto")
    assert chosen == "torch" and "pip install 'fluid-app[mlx]'" in reason


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_the_readme_has_a_mac_line_installing_the_mlx_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    apple = "sys_platform == 'darwin' and platform_machine == 'arm64'"
    assert {re.split(r"[<>=;\[ ]", requirement)[0] for requirement in extras["mlx"]} == {"mlx", "mlx-lm"}
    assert all(apple in requirement for requirement in extras["mlx"])
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"Apple Silicon[\s\S]{0,300}?```bash\n[^\n]*pip install -e \"\.\[demo,mlx\]\"[^\n]*python app\.py", readme)
