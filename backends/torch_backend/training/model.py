"""Loading the model to train, attaching LoRA, and the FLUID loss module.

:class:`FluidLossModule` runs the decoder once on an expanded batch and applies the LM head
only to the positions that carry a label (far fewer than ``L``, and the logits are the
largest activation of a step). It returns loss *sums* and token counts, main and mask
separately, so the trainer can normalise by the token count of the whole global batch:
that is what makes gradient accumulation and any number of ranks give the same update.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fluid_app.errors import FluidError
from fluid_app.hf_config import context_length
from fluid_app.layout import IGNORE_INDEX
from fluid_app.model_refs import ModelSpec

from ..loader import ensure_mask_token, load_pretrained
from ..lora_merge import PREFIX, read_plain_lora


@dataclass
class LoadedBase:
    model: Any
    tokenizer: Any
    mask_token_id: int
    added_mask_token: bool
    max_context: int


def load_base(spec: ModelSpec, *, dtype: torch.dtype, attn_implementation: str,
              mask_token_id: int | None = None) -> LoadedBase:
    """Base causal LM + tokenizer; pick the MASK token, adding (and resizing) if needed."""
    tokenizer, model = load_pretrained(spec, dtype=dtype, attn_implementation=attn_implementation)
    mask_token_id, added = ensure_mask_token(model, tokenizer, mask_token_id)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    return LoadedBase(model, tokenizer, int(mask_token_id), added, context_length(model.config.to_dict()))


def attach_lora(model: Any, *, rank: int, alpha: int, dropout: float, mask_token_id: int,
                train_mask_embedding: bool):
    """LoRA on every linear layer (authors' recipe); optionally a trainable MASK embedding row
    (peft ``trainable_token_indices``: only that row is trained and saved)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        task_type="CAUSAL_LM",
                        trainable_token_indices=[mask_token_id] if train_mask_embedding else None)
    return get_peft_model(model, config)


def start_from_adapter(model: Any, adapter_dir: Path, *, rank: int, alpha: int) -> int:
    """Load a finished LoRA adapter into a freshly attached one; returns the layers loaded.

    Why: a run that continues a shipped checkpoint on new data (or with more capacity) should
    start where that checkpoint is, not at zero. A larger ``rank`` keeps the old factors in its
    first ranks and leaves the new ones as peft made them (``A`` random, ``B`` zero), so the
    model at step 0 computes exactly what the checkpoint computes and the extra ranks only add
    room to learn. ``B`` is rescaled when the two ``alpha / r`` scalings differ, for the same
    reason. The checkpoint must adapt exactly the layers this run adapts.
    """
    old_rank, old_scaling, pairs = read_plain_lora(adapter_dir)
    if old_rank > rank:
        raise FluidError(f"the adapter in {adapter_dir} has rank {old_rank}, more than --lora-rank {rank}; "
                         f"pass --lora-rank {old_rank} or more", "lora_rank")
    layers = {name.removeprefix(PREFIX): module for name, module in model.named_modules()
              if "default" in getattr(module, "lora_A", {})}
    if set(layers) != set(pairs):
        missing, extra = sorted(set(layers) - set(pairs)), sorted(set(pairs) - set(layers))
        raise FluidError(f"the adapter in {adapter_dir} does not adapt the layers this run trains "
                         f"(not in it: {missing[:3]}; only in it: {extra[:3]}); start from an adapter "
                         "trained on this base with LoRA on every linear layer")
    scale = old_scaling / (alpha / rank)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            new_a, new_b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
            if a.shape != (old_rank, new_a.shape[1]) or b.shape != (new_b.shape[0], old_rank):
                raise FluidError(f"the adapter in {adapter_dir} does not fit this base model ({name}); "
                                 "start from an adapter trained on the same base")
            new_a[:old_rank].copy_(a.to(new_a.dtype))
            new_b[:, :old_rank].copy_((b.float() * scale).to(new_b.dtype))
            new_b[:, old_rank:].zero_()
    return len(pairs)


def causal_lm(model: Any):
    """The transformers ``*ForCausalLM`` inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


AR_LOSSES = ("ce", "kl")
MASK_LOSSES = ("ce", "kl")
TOP1_CHUNK = 8192  # LM-head rows at a time for ``top1``: all mask slots' logits at once can take gigabytes


class FluidLossModule(nn.Module):
    """Decoder forward on an expanded batch -> (sum_ar, sum_diff, n_ar, n_diff).

    ``ar_loss`` picks what main tokens learn. ``"ce"`` is the method's plain AR loss on the
    labels. ``"kl"`` is the cross-entropy against the *frozen base model's* next-token
    distribution (the LoRA adapter switched off), which is the KL to the base up to a
    constant: with self-distilled labels, hard targets sharpen the model towards its own
    greedy choices and raise its perplexity on other text; soft targets keep its AR
    behaviour where it was while the masks learn to draft.

    ``mask_loss`` picks what mask slots learn. ``"ce"`` is the method's loss on the labels.
    ``"kl"`` is the cross-entropy against the model's *own* next-token distribution at the
    main token of the same position (detached): the ``p`` that sampled decoding verifies a
    mask draft against, tried to raise the chance ``sum(min(p, q))`` that a sampled draft is
    kept. On the embedded default it lowered it (the recipe's "Soft mask targets"): a slot
    cannot see the tokens before it in its block, so it learns their average ``p``, broader
    than the ``p`` it is checked against. The option stays for that ablation.

    The wrapper is what DDP/FSDP wrap, so gradient hooks see the whole forward.
    """

    def __init__(self, model: Any, ar_loss: str = "ce", mask_loss: str = "ce"):
        super().__init__()
        if ar_loss not in AR_LOSSES:
            raise ValueError(f"ar_loss must be one of {AR_LOSSES}, not {ar_loss!r}")
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, not {mask_loss!r}")
        self.model = model
        self.ar_loss = ar_loss
        self.mask_loss = mask_loss
        lm = causal_lm(model)
        self._decoder_name = lm.base_model_prefix

    def hidden_states(self, input_ids, position_ids, attention_mask) -> torch.Tensor:
        lm = causal_lm(self.model)
        decoder = getattr(lm, self._decoder_name)
        out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids, position_ids, attention_mask, labels, is_mask, top1: bool = False):
        """The loss sums and counts; with ``top1``, instead the argmax token of every labelled
        mask slot, in row-major order (what the held-out draft evaluation scores). Both go
        through ``forward`` so that FSDP gathers the weights for either."""
        hidden = self.hidden_states(input_ids, position_ids, attention_mask)
        selected = labels != IGNORE_INDEX
        head = causal_lm(self.model).get_output_embeddings()
        if top1:
            rows = hidden[selected & is_mask]
            return torch.cat([head(rows[i:i + TOP1_CHUNK]).argmax(-1) for i in range(0, rows.shape[0], TOP1_CHUNK)]) \
                if rows.shape[0] else torch.zeros(0, dtype=torch.long, device=rows.device)
        logits = head(hidden[selected]).float()
        on_mask = is_mask[selected]
        main_logits, mask_logits = logits[~on_mask], logits[on_mask]
        if self.ar_loss == "kl":
            targets = self._base_probabilities(input_ids, position_ids, attention_mask, is_mask, selected & ~is_mask)
            ar_losses = _soft_cross_entropy(targets, main_logits)
        else:
            ar_losses = F.cross_entropy(main_logits, labels[selected & ~is_mask], reduction="none")
        if self.mask_loss == "kl":
            own = F.softmax(main_logits.detach(), dim=-1)
            mask_losses = _soft_cross_entropy(own[_main_rows_of_masks(position_ids, is_mask, selected)], mask_logits)
        else:
            mask_losses = F.cross_entropy(mask_logits, labels[selected & is_mask], reduction="none")
        return (ar_losses.sum(), mask_losses.sum(),
                (~on_mask).sum(), on_mask.sum())

    @torch.no_grad()
    def _base_probabilities(self, input_ids, position_ids, attention_mask, is_mask, main_selected) -> torch.Tensor:
        """Next-token probabilities of the adapter-free model at the labelled main tokens.

        Main tokens attend only to main tokens, causally, so when every row's labelled main
        tokens come before its first mask (the default masks-last layout) a plain causal
        pass over that prefix gives them exactly; otherwise the whole expanded batch is run.
        """
        if not hasattr(self.model, "disable_adapter"):
            raise ValueError("ar_loss='kl' needs a LoRA model: the frozen base is the adapter switched off")
        prefix = _main_prefix_width(is_mask, main_selected)
        with self.model.disable_adapter():
            if prefix is not None:
                hidden = self.hidden_states(input_ids[:, :prefix], position_ids[:, :prefix], None)
                chosen = main_selected[:, :prefix]
            else:
                hidden = self.hidden_states(input_ids, position_ids, attention_mask)
                chosen = main_selected
            head = causal_lm(self.model).get_output_embeddings()
            return F.softmax(head(hidden[chosen]).float(), dim=-1)


def _soft_cross_entropy(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row, the cross-entropy of ``logits`` against the distribution ``targets``: what the
    two ``kl`` losses compute (the KL up to the targets' own entropy, a constant)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def _main_rows_of_masks(position_ids: torch.Tensor, is_mask: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """For each labelled mask slot (row-major), the index among the labelled main tokens
    (row-major) of the main token at the same row and position: a slot and that main token
    predict the same next token, so the main token's distribution is the slot's target."""
    main = selected & ~is_mask
    order = torch.cumsum(main.flatten().long(), 0).reshape(main.shape) - 1
    batch = torch.arange(main.shape[0], device=main.device)[:, None].expand_as(main)
    table = torch.full((main.shape[0], int(position_ids.max()) + 1), -1, dtype=torch.long, device=main.device)
    table[batch[main], position_ids[main]] = order[main]
    slots = selected & is_mask
    rows = table[batch[slots], position_ids[slots]]
    if bool((rows < 0).any()):
        raise ValueError("a labelled mask slot has no labelled main token at its position")
    return rows


def _main_prefix_width(is_mask: torch.Tensor, main_selected: torch.Tensor) -> int | None:
    """Width of the column prefix holding every labelled main token, if each row has all of
    them before its first mask; ``None`` for interleaved layouts."""
    columns = torch.arange(is_mask.shape[1], device=is_mask.device)
    first_mask = torch.where(is_mask, columns, is_mask.shape[1]).min(dim=1).values
    last_main = torch.where(main_selected, columns, -1).max(dim=1).values
    if bool((last_main >= first_mask).any()):
        return None
    return int(last_main.max()) + 1
