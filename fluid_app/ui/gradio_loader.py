"""Import Gradio without rewriting its type stubs, the larger half of its import time.

Every ``import gradio`` parses the source file of each of its ~80 component classes and
rewrites the matching ``.pyi`` stub in site-packages (``gradio.component_meta.
create_or_modify_pyi``, called from the component metaclass). The stubs serve type checkers
while developing Gradio itself; nothing reads them at run time. On a 2-core CPU that work took
about 2.5 s of a 4.5 s import, a quarter of the demo's start. So the demo imports Gradio here:
a one-shot import hook swaps that one function for a no-op as soon as its module has run,
before any component class is built. A Gradio without the function (or one already imported)
imports as it is.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any, Sequence

STUB_MODULE = "gradio.component_meta"
STUB_WRITER = "create_or_modify_pyi"


def _no_stub_writing(*args: Any, **kwargs: Any) -> None:
    """Stands in for Gradio's stub writer: the demo never reads the stubs."""


class _SkipStubWriting(importlib.abc.MetaPathFinder):
    """Finds ``gradio.component_meta`` through the other finders, then runs it and replaces its
    stub writer before the import returns; removes itself on first use."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname != STUB_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            if hasattr(module, STUB_WRITER):
                setattr(module, STUB_WRITER, _no_stub_writing)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def import_gradio() -> ModuleType:
    """``import gradio``, without the stub rewriting when Gradio is not imported yet."""
    if STUB_MODULE not in sys.modules and not any(isinstance(f, _SkipStubWriting) for f in sys.meta_path):
        sys.meta_path.insert(0, _SkipStubWriting())
    import gradio

    return gradio
