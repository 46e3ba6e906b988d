"""The PyTorch backend's own Llama-family forward computes transformers' outputs, bit for bit.

Inference loads of Llama, Mistral, Qwen2 and Qwen3 run :mod:`backends.torch_backend.llama_family`
instead of transformers' model classes (it starts seconds faster). Every decode session
operation (a padded batch prefill, windows, holes left by uneven commits, rows added, dropped,
rewound and extended) is driven through both models, and every logit must be equal; what the
module does not compute the same way must go to transformers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fluid_app
from backends.llama_shape import shape_of
from backends.torch_backend.llama_family import LlamaFamilyLM
from backends.torch_backend.loader import load_pretrained, prepare
from fluid_app.model_refs import resolve_model


def _both(folder):
    spec = resolve_model(str(folder))
    backends = []
    for own in (True, False):
        tokenizer, model = load_pretrained(spec, dtype=torch.float32, own_forward=own)
        backends.append(prepare(spec, tokenizer, model, torch.device("cpu")))  # packed, as decoding runs
    return backends


def _session_logits(backend, edits: bool) -> list[np.ndarray]:
    """Logits of one scripted decode session: every shape of forward the sampler makes."""
    out = []
    session, first = backend.start([[5, 6, 7, 8, 9], [10, 11, 12]], logits=True)  # padded prefill
    out.append(first.logits)
    out.append(session.forward(np.array([[1, 2, 3, 4], [5, 6, 7, 8]])).logits)  # window over a padded cache
    session.commit([4, 2])  # uneven: holes
    out.append(session.forward(np.array([[9], [10]])).logits)  # one masked query (GQA folded into it)
    session.commit([1, 1])
    if edits:
        out.append(session.add([[20, 21, 22, 23, 24, 25, 26]]).logits)
        out.append(session.forward(np.array([[1, 2], [3, 4], [5, 6]])).logits)
        session.commit([2, 1, 0])
        session.drop([0])
    out.append(session.forward(np.array([[7, 8, 9]] * len(session.lengths))).logits)
    session.commit([3] * len(session.lengths))
    solo, first = backend.start([[5, 6, 7, 8, 9, 10]], logits=True)  # causal prefill: no mask
    out.append(first.logits)
    out.append(solo.forward(np.array([[1]])).logits)  # one query, no mask: SDPA's own GQA
    solo.commit([1])
    out.append(solo.forward(np.array([[1, 2, 3]])).logits)  # a window: a causal mask over the cache
    solo.commit([2])
    if edits:
        solo.truncate([4])
        out.append(solo.extend([[3, 4, 5]]).logits)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_every_session_forward_equals_transformers_bitwise(tiny_model_dir, arch):
    ours, theirs = _both(tiny_model_dir(arch))
    assert isinstance(ours.model, LlamaFamilyLM) and not isinstance(theirs.model, LlamaFamilyLM)
    # transformers' Mistral cache keeps its own length count, which the session's row edits
    # (add, drop, truncate) do not update: its model cannot run them (ours can)
    edits = arch != "mistral"
    for step, (a, b) in enumerate(zip(_session_logits(ours, edits), _session_logits(theirs, edits), strict=True)):
        assert a.shape == b.shape and np.array_equal(a, b), (arch, step, float(np.abs(a - b).max()))


def test_what_is_computed_differently_goes_to_transformers(tiny_model_dir):
    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 400, "rope_theta": 10000.0,
            "max_position_embeddings": 512}
    assert shape_of(base) is not None
    assert shape_of({**base, "model_type": "mistral", "sliding_window": 4096,  # cannot bind in 512
                     "layer_types": ["sliding_attention", "full_attention"]}) is not None
    assert shape_of({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}).rope_theta == 5e5
    refused = [
        {**base, "model_type": "gpt2"},
        {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
        {**base, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {**base, "model_type": "mistral", "sliding_window": 128},  # binds inside the context
        {**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64},
        {**base, "layer_types": ["full_attention", "linear_attention"]},
        {**base, "hidden_act": "gelu"},
        {**base, "quantization_config": {"quant_method": "gguf"}},
        {key: value for key, value in base.items() if key != "rope_theta"},
    ]
    assert all(shape_of(config) is None for config in refused)
    gpt2 = fluid_app.load(str(tiny_model_dir("gpt2")), backend="torch", device="cpu")
    assert not isinstance(gpt2.backend.model, LlamaFamilyLM)


@pytest.mark.parametrize("tied", [False, True])
def test_grown_vocabulary_equals_transformers_bitwise(tiny_model_dir, tmp_path, tied):
    """A base without a spare token gets a MASK row added (``add_embedding_rows``): the grown
    embeddings and output layer, tied or not, compute what transformers' resized model does."""
    import json
    import shutil

    from backends.torch_backend.loader import add_embedding_rows

    folder = shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tied}))
    spec = resolve_model(str(folder))
    backends = []
    for own in (True, False):
        tokenizer, model = load_pretrained(spec, dtype=torch.float32, own_forward=own)
        rows = model.get_input_embeddings().weight.shape[0] + 3
        add_embedding_rows(model, rows)
        assert model.get_output_embeddings().weight.shape[0] == rows
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
        backends.append(prepare(spec, tokenizer, model, torch.device("cpu")))
    ours, theirs = backends
    assert isinstance(ours.model, LlamaFamilyLM) and not isinstance(theirs.model, LlamaFamilyLM)
    new_row = rows - 1
    for a, b in zip(_session_logits(ours, True), _session_logits(theirs, True), strict=True):
        assert a.shape[-1] == rows and np.array_equal(a, b), float(np.abs(a - b).max())
    first = ours.start([[5, new_row, 7]], logits=True)[1].logits  # the new row is read, not just carried
    assert np.array_equal(first, theirs.start([[5, new_row, 7]], logits=True)[1].logits)


def _has_amx() -> bool:
    """Whether the CPU has AMX, which the bitwise bfloat16 window guarantee is made for (README,
    ``--dtype``). Without it the windows can differ in the last bits even where every layer
    shape passes the row check below: seen on a 2-core AMD EPYC with AVX512-BF16."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return "amx_bf16" in info.read()
    except OSError:
        return False


def _bfloat16_matmul_rows_invariant(model: torch.nn.Module, widths=(3, 5, 8)) -> bool:
    """Whether this CPU's bfloat16 linear layers give a row the same bits whatever the number of
    rows in the call, for every shape of ``model``'s layers (true with AMX; a CPU that emulates
    bfloat16 may block rows differently, and then no attention scheme makes a window equal
    one-token forwards). Every shape, because it depends on it: on a 2-core AMD EPYC with
    AVX512-BF16 a 64 -> 96 layer was invariant and SmolLM2's 1536 -> 576 was not."""
    generator = torch.Generator().manual_seed(0)
    shapes = {(m.in_features, m.out_features): m for m in model.modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        for layer in shapes.values():
            x = torch.randn(1, max(widths), layer.in_features, generator=generator).to(torch.bfloat16)
            solo = [layer(x[:, j:j + 1]) for j in range(max(widths))]
            if not all(torch.equal(layer(x[:, :m])[:, j], solo[j][:, 0]) for m in widths for j in range(m)):
                return False
    return True


def test_a_bfloat16_window_equals_one_token_forwards_bitwise():
    """FLUID stays identical to AR in bfloat16 on a CPU: a decoding window's logits are bitwise
    those of one-token forwards (each query attended as a one-token forward attends it). The
    embedded default, because SDPA's blocking only shows at its sizes (tiny configs pass without
    the per-query attention; this fails without it)."""
    from backends.torch_backend.loader import load

    backend = load(resolve_model("default"), device="cpu", dtype="bfloat16")
    assert isinstance(backend.model, LlamaFamilyLM) and backend.model.dtype == torch.bfloat16
    if not _has_amx() or not _bfloat16_matmul_rows_invariant(backend.model):
        pytest.skip("this CPU computes bfloat16 without AMX: no bitwise window guarantee here")
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 40000, size=300)]
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, 40000, size=16)]
    one, _ = backend.start([prompt], logits=True)
    expected = []
    for token in tokens:
        expected.append(one.forward(np.array([[token]])).logits[0, 0])
        one.commit([1])
    window, _ = backend.start([prompt], logits=True)
    got, at = [], 0
    for width in (3, 5, 8):
        got.extend(window.forward(np.array([tokens[at:at + width]])).logits[0])
        window.commit([width])
        at += width
    assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
