"""Loading through transformers, shared by both backends.

Both backends load the tokenizer (what the core calls) here: a decoding load reads a plain
``tokenizer.json`` folder without transformers (:mod:`.json_tokenizer`), every other load
through transformers. The torch backend's weights come through transformers unless its own
Llama-family forward takes them, MLX's through mlx-lm, and a GGUF base is converted once
through transformers' GGUF reader. One quiet loader serves all.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fluid_app.errors import FluidError, first_line

from . import json_tokenizer


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


def load_tokenizer(folder: Path, label: str = "", gguf_file: str | None = None, *, lean: bool = False) -> Any:
    """The Hugging Face tokenizer of a model folder (or of a GGUF file in it).

    ``lean`` (loads that decode, never save): a folder :func:`.json_tokenizer.read` can take is
    read without importing transformers. Otherwise a folder whose ``tokenizer_config.json``
    names the generic ``tokenizer.json`` reader (what the GGUF conversion writes) gets that
    class directly: the same object ``AutoTokenizer`` returns, without the seconds
    ``AutoTokenizer`` spends importing model registries.
    """
    if lean and not gguf_file and (tokenizer := json_tokenizer.read(Path(folder))) is not None:
        return tokenizer
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with quiet():
        try:
            if not gguf_file and _tokenizer_class(Path(folder)) in json_tokenizer.GENERIC_TOKENIZERS:
                from transformers import PreTrainedTokenizerFast

                return PreTrainedTokenizerFast.from_pretrained(str(folder))
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FluidError(f"cannot load a tokenizer from {label or folder}: {first_line(exc)}", "model") from None


def _tokenizer_class(folder: Path) -> str | None:
    """The ``tokenizer_class`` named in ``folder/tokenizer_config.json``, when it has a ``tokenizer.json``."""
    if not (folder / "tokenizer.json").is_file():
        return None
    value = (json_tokenizer.read_config(folder) or {}).get("tokenizer_class")
    return value if isinstance(value, str) else None
