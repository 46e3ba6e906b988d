"""Loading through transformers, shared by both backends.

The torch backend loads tokenizer and weights with transformers; the MLX backend loads
weights with mlx-lm but the tokenizer (what the core calls) with transformers too, and a
GGUF base is converted once through transformers' GGUF reader. One quiet loader serves all.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fluid_app.errors import FluidError, first_line


@contextmanager
def quiet(progress: bool = False) -> Iterator[None]:
    """Silence transformers' warnings, and its progress bars unless ``progress`` (a one-off
    conversion shows its bar: it takes seconds), while loading (errors still raise)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    logging.getLogger("gguf").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def load_tokenizer(folder: Path, label: str = "", gguf_file: str | None = None) -> Any:
    """The Hugging Face tokenizer of a model folder (or of a GGUF file in it)."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with quiet():
        try:
            return AutoTokenizer.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FluidError(f"cannot load a tokenizer from {label or folder}: {first_line(exc)}", "model") from None
