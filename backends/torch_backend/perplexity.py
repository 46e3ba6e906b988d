"""Teacher-forced AR perplexity on labelled tokens, for ``fluid eval-ppl``.

The adapter must not damage the model it adapts: main tokens under the FLUID rule are plain
causal positions, so the adapted model's ordinary next-token loss on held-out replies,
next to the base model's, measures exactly what LoRA changed in AR behaviour.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from fluid_app.data import Example
from fluid_app.layout import IGNORE_INDEX


@torch.inference_mode()
def assistant_nll(model: Any, examples: Sequence[Example], device: torch.device,
                  desc: str = "scoring") -> tuple[float, int]:
    """Summed next-token negative log-likelihood of every labelled token, and their count."""
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    for example in tqdm(examples, desc=desc, unit="conv", dynamic_ncols=True, leave=False):
        ids = torch.tensor([example.input_ids], device=device)
        targets = torch.tensor(example.labels[1:], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        scored = targets != IGNORE_INDEX
        if scored.any():
            total += float(F.cross_entropy(logits[scored], targets[scored], reduction="sum"))
            count += int(scored.sum())
    return total, count
