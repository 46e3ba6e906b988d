"""Stage I layouts and the attention rule against brute-force readings of FLUID_METHOD.md 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fluid_app.attention import attention_mask
from fluid_app.layout import IGNORE_INDEX, build_layout

MASK = 3


def random_example(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(5, 300, size=n)
    labels = ids.copy()
    labels[: rng.integers(0, n // 2)] = IGNORE_INDEX  # a prompt whose tokens carry no loss
    return ids, labels


def rule_by_hand(layout, q: int, k: int) -> bool:
    """FLUID_METHOD.md 3.4, read literally, one pair at a time."""
    q_anchor, k_anchor = int(layout.anchor_ids[q]), int(layout.anchor_ids[k])
    q_mask, k_mask = bool(layout.is_mask[q]), bool(layout.is_mask[k])
    if not k_mask and k_anchor <= q_anchor:
        return True
    return k_mask and q_mask and k_anchor == q_anchor and layout.position_ids[k] <= layout.position_ids[q]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("masks_last", [True, False])
def test_materialised_mask_equals_brute_force_rule(seed, masks_last):
    rng = np.random.default_rng(seed)
    ids, labels = random_example(rng, int(rng.integers(2, 40)))
    layout = build_layout(ids, labels, mask_token_id=MASK, k_max=int(rng.integers(1, 9)), rng=rng,
                          vocab_size=400, masks_last=masks_last)
    dense = attention_mask(layout)
    expected = np.array([[rule_by_hand(layout, q, k) for k in range(len(layout))] for q in range(len(layout))],
                        dtype=bool).reshape(len(layout), len(layout))
    assert np.array_equal(dense, expected)


def test_layout_positions_labels_and_restoration_follow_the_method():
    rng = np.random.default_rng(7)
    ids, labels = random_example(rng, 30)
    layout = build_layout(ids, labels, mask_token_id=MASK, k_max=5, rng=rng, vocab_size=400)
    n = len(ids)
    assert layout.num_main == n
    assert np.array_equal(layout.input_ids[:n], ids) and np.array_equal(layout.position_ids[:n], np.arange(n))
    shifted = np.append(labels[1:], IGNORE_INDEX)
    assert np.array_equal(layout.labels[:n], shifted)
    blocks = layout.mask_blocks()
    assert blocks, "with anchor rate 0.5 and 30 tokens some anchors must exist"
    for anchor, slots in blocks.items():
        assert shifted[anchor] != IGNORE_INDEX  # anchors are response positions
        assert 1 <= len(slots) <= 5
        for j, slot in enumerate(slots, start=1):
            pos = anchor + j
            assert layout.position_ids[slot] == pos
            assert layout.labels[slot] == (shifted[pos] if pos < n else IGNORE_INDEX)
            token = layout.input_ids[slot]
            if not layout.restored[slot]:
                assert token == MASK
            else:
                assert pos < n and token != MASK  # the true x_pos, or a noisy regular token


def test_layout_is_deterministic_under_a_seed_and_varies_across_seeds():
    ids, labels = random_example(np.random.default_rng(0), 50)
    make = lambda seed: build_layout(ids, labels, mask_token_id=MASK, k_max=8,  # noqa: E731
                                     rng=np.random.default_rng(seed), vocab_size=400)
    a, b, c = make(1), make(1), make(2)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "position_ids", "labels", "is_mask"))
    assert not np.array_equal(a.input_ids, c.input_ids) or not np.array_equal(a.position_ids, c.position_ids)


def test_stage2_layout_has_exactly_k_unrestored_masks_per_anchor():
    ids, labels = random_example(np.random.default_rng(3), 40)
    layout = build_layout(ids, labels, mask_token_id=MASK, k_max=6, fixed_k=6, restore=False,
                          rng=np.random.default_rng(0))
    assert not layout.restored.any()
    assert all(len(slots) == 6 for slots in layout.mask_blocks().values())
    assert (layout.input_ids[layout.is_mask] == MASK).all()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_main_token_logits_under_fluid_layout_equal_plain_causal_logits(tiny_model_dir, implementation):
    """Strictly Causal Alignment: main tokens never see masks, so the AR loss is untouched."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), attn_implementation=implementation).eval()
    rng = np.random.default_rng(11)
    for _ in range(3):
        ids, labels = random_example(rng, 48)
        layout = build_layout(ids, labels, mask_token_id=MASK, k_max=8, rng=rng, vocab_size=400)
        allowed = torch.tensor(attention_mask(layout))[None, None]
        mask = allowed if implementation == "sdpa" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        with torch.no_grad():
            expanded = model(input_ids=torch.tensor(layout.input_ids)[None],
                             position_ids=torch.tensor(layout.position_ids)[None], attention_mask=mask).logits[0]
            plain = model(input_ids=torch.tensor(ids)[None]).logits[0]
        assert len(layout) > len(ids)
        torch.testing.assert_close(expanded[: len(ids)], plain, atol=1e-5, rtol=0)
