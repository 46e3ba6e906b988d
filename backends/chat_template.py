"""Chat templates rendered the way transformers renders them, without importing transformers.

Why: the tokenizer of an inference load is read from ``tokenizer.json`` alone (see
:mod:`.json_tokenizer`); its chat template must still give the very text transformers'
``apply_chat_template(messages, add_generation_prompt=..., tokenize=False)`` gives, or the
prompt (and so the reply) would change. A chat template is untrusted code from a model
repository: it runs in Jinja's immutable sandbox with the same additions transformers makes
(``trim_blocks``/``lstrip_blocks``, loop controls, a ``tojson`` that keeps non-ASCII text,
``raise_exception``, ``strftime_now``, a ``dict`` and a ``namespace`` that refuse
underscore names). ``tests/test_json_tokenizer.py`` checks the output against transformers'.
Templates that use transformers' ``{% generation %}`` tag are left to transformers.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' own template tag for assistant masks: its extension is not reproduced here
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def supported(template: str) -> bool:
    """Whether :func:`render` renders ``template`` as transformers would."""
    return GENERATION_TAG.search(template) is None


def render(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool,
           special_tokens: dict[str, str]) -> str:
    """The text of ``messages`` through ``template``; ``special_tokens`` (``bos_token``, ...) are
    visible to it as transformers passes them. Messages drop keys whose value is None, as
    transformers' do."""
    chat = [{key: value for key, value in dict(message).items() if value is not None} for message in messages]
    return _compiled(template).render(messages=chat, tools=None, documents=None,
                                      add_generation_prompt=add_generation_prompt, **special_tokens)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, and nothing else of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore attribute names (no way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: ``namespace(self=...)`` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace (got {name!r})")


@lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env.from_string(template)
