"""Choosing the MASK token (FLUID_METHOD.md section 2).

The authors reuse an unused special token of their base model so that no embedding row has
to be added. "Unused" here means: registered as special, not one of bos/eos/pad/unk, and not
written anywhere in the chat template. The last such id wins (tokenizers tend to list the
tokens they really use first).
"""

from __future__ import annotations

from typing import Any

NEW_MASK_TOKEN = "<|fluid_mask|>"


def unused_special_token(tokenizer: Any) -> int | None:
    """Id of an unused special token of a Hugging Face tokenizer, or None if it has none."""
    roles = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "cls_token_id")
    reserved = {getattr(tokenizer, role, None) for role in roles}
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    candidates = [
        token_id
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if added.special and token_id not in reserved and added.content not in template
    ]
    return max(candidates) if candidates else None
