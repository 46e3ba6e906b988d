"""A model's tokenizer read from ``tokenizer.json`` by the ``tokenizers`` library alone.

Why: on a 2-core CPU, importing transformers and building its tokenizer took about 1.2 s of
a 4.5 s ``fluid generate`` start. Decoding needs only what the core calls (encode, decode,
the chat template, the special tokens), and transformers' tokenizer for a ``tokenizer.json``
folder is a wrapper around this same Rust tokenizer. So inference loads read the file
directly, for folders whose ``tokenizer_config.json`` asks for nothing transformers would
add on top of the file (:func:`read`); any other folder, and every load that trains or
saves, gets transformers' own tokenizer. ``tests/test_json_tokenizer.py`` holds the two
to equal outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken, Tokenizer

from . import chat_template

# tokenizer classes that are transformers' generic ``tokenizer.json`` reader itself
GENERIC_TOKENIZERS = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys whose meaning is reproduced here (or has no effect on encode/decode);
# any other key (add_bos_token, add_prefix_space, added_tokens_decoder, ...) leaves the folder to transformers
KNOWN_KEYS = frozenset({
    *NAMED_SPECIAL_TOKENS, "extra_special_tokens", "backend", "tokenizer_class", "model_max_length", "is_local",
    "local_files_only", "clean_up_tokenization_spaces", "chat_template", "padding_side", "truncation_side",
    "model_input_names",
})
# transformers patches the pre-tokenizer of some tokenizers of at least this many tokens
LARGEST_VOCABULARY = 100_000


def read(folder: Path) -> JsonTokenizer | None:
    """The tokenizer of ``folder`` if it can be read without transformers, else None."""
    folder = Path(folder)
    config = read_config(folder)
    if (config is None or config.get("tokenizer_class") not in GENERIC_TOKENIZERS or set(config) - KNOWN_KEYS
            or config.get("clean_up_tokenization_spaces") or (folder / "additional_chat_templates").exists()):
        return None
    template = config.get("chat_template")
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        if template is not None:
            return None  # two templates: which one wins is transformers' business
        template = template_file.read_text(encoding="utf-8")
    if template is not None and not (isinstance(template, str) and chat_template.supported(template)):
        return None
    named = {key: config.get(key) for key in NAMED_SPECIAL_TOKENS}
    extra = config.get("extra_special_tokens", [])
    if not isinstance(extra, list) or not all(isinstance(v, str) for v in (*extra, *filter(None, named.values()))):
        return None
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # tokenizers raises plain Exception for a damaged file; transformers names it
        return None
    if (tokenizer.truncation is not None or tokenizer.padding is not None or tokenizer.post_processor is None
            or tokenizer.get_vocab_size(with_added_tokens=True) >= LARGEST_VOCABULARY):
        return None
    added = {token.content: token for token in tokenizer.get_added_tokens_decoder().values()}
    if not all(_plain_special(added.get(value)) for value in (*extra, *filter(None, named.values()))):
        return None  # transformers would (re-)add these tokens with its own flags
    return JsonTokenizer(tokenizer, named, extra, template, str(folder))


def read_config(folder: Path) -> dict[str, Any] | None:
    """``folder/tokenizer_config.json`` as a dict, or None when it is missing or not a JSON object."""
    try:
        value = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _plain_special(token: AddedToken | None) -> bool:
    """An added token flagged exactly as transformers flags the special tokens it adds."""
    return (token is not None and token.special and not token.normalized and not token.lstrip
            and not token.rstrip and not token.single_word)


class JsonTokenizer:
    """The part of transformers' tokenizer API that decoding uses, with its results."""

    def __init__(self, tokenizer: Tokenizer, named: dict[str, str | None], extra: Sequence[str],
                 template: str | None, name_or_path: str):
        self._tokenizer = tokenizer
        self._named = dict(named)
        self.extra_special_tokens = list(extra)
        self.chat_template = template
        self.name_or_path = name_or_path

    def __getattr__(self, name: str) -> Any:
        """``bos_token`` ... ``mask_token`` and their ``*_id``: None when the tokenizer has none."""
        named = self.__dict__.get("_named", {})
        if name in named:
            return named[name]
        if name.endswith("_id") and name[:-3] in named:
            token = named[name[:-3]]
            return None if token is None else self._tokenizer.token_to_id(token)  # present: read() checked
        raise AttributeError(name)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._tokenizer.get_added_tokens_decoder()

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {key: value for key, value in self._named.items() if value is not None}

    @property
    def all_special_ids(self) -> list[int]:
        tokens = dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens])
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int] | None:
        if not isinstance(tokens, str):
            return [self.convert_tokens_to_ids(token) for token in tokens]
        index = self._tokenizer.token_to_id(tokens)
        return index if index is not None else self.unk_token_id

    def __call__(self, text: str, add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False) -> dict[str, list]:
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        out = {"input_ids": list(encoding.ids), "attention_mask": list(encoding.attention_mask)}
        if return_offsets_mapping:
            out["offset_mapping"] = list(encoding.offsets)
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, token_ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in token_ids] if hasattr(token_ids, "__iter__") else [int(token_ids)]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def add_special_tokens(self, tokens: dict[str, Sequence[str]]) -> int:
        """Only ``{"additional_special_tokens": [...]}`` (how a new MASK token is added); the new
        tokens replace the extra special tokens, as in transformers."""
        if set(tokens) != {"additional_special_tokens"} or not all(isinstance(t, str) for t in tokens[
                "additional_special_tokens"]):
            raise ValueError(f"cannot add special tokens {tokens!r} to a tokenizer.json tokenizer")
        new = list(tokens["additional_special_tokens"])
        if new:
            self.extra_special_tokens = new
        return self._tokenizer.add_special_tokens(
            [AddedToken(t, rstrip=False, lstrip=False, normalized=False, special=True) for t in new])

    def apply_chat_template(self, conversation: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> str | dict[str, list]:
        """The rendered text (``tokenize=False``), else its encoding without added special tokens
        (a dict with ``input_ids``, as transformers 5 returns by default)."""
        if not self.chat_template:
            raise ValueError("the tokenizer has no chat template")
        if not conversation:
            raise ValueError("cannot apply a chat template to an empty conversation")
        text = chat_template.render(self.chat_template, conversation, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens_map)
        return self(text, add_special_tokens=False) if tokenize else text
