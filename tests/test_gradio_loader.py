"""The demo imports Gradio without Gradio's stub rewriting (fluid_app/ui/gradio_loader.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("gradio")
ROOT = Path(__file__).resolve().parents[1]


def run(code: str) -> str:
    """Runs ``code`` in a fresh interpreter (this one may have imported Gradio already)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_gradio_imports_with_its_stub_writer_swapped_out_and_the_hook_gone():
    out = run("""
        import sys
        from fluid_app.ui import gradio_loader
        gr = gradio_loader.import_gradio()
        import gradio.component_meta as meta
        print(meta.create_or_modify_pyi is gradio_loader._no_stub_writing,
              any(isinstance(f, gradio_loader._SkipStubWriting) for f in sys.meta_path),
              callable(gr.Button().click), gr is sys.modules["gradio"])
    """)
    assert out == "True False True True"


def test_a_gradio_imported_before_is_left_as_it_is():
    out = run("""
        import sys
        import gradio
        from fluid_app.ui import gradio_loader
        import gradio.component_meta as meta
        writer = meta.create_or_modify_pyi
        print(gradio_loader.import_gradio() is gradio, meta.create_or_modify_pyi is writer,
              any(isinstance(f, gradio_loader._SkipStubWriting) for f in sys.meta_path))
    """)
    assert out == "True True False"
