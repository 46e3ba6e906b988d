"""Stage I / Stage II training through the real torch, transformers and peft (CPU, tiny models)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file
from training_helpers import chat_file_fixture, read_log, stage1_options
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.torch_backend.training.collate import collate
from backends.torch_backend.training.masks import mask_mod_for, sdpa_mask
from backends.torch_backend.training.model import FluidLossModule, attach_lora, start_from_adapter
from backends.torch_backend.training.stage1 import run_stage1
from backends.torch_backend.training.stage2 import Stage2Options, run_stage2
from fluid_app.data import build_examples, read_conversations
from fluid_app.layout import IGNORE_INDEX, build_layout

chat_file = chat_file_fixture(48)
_opts = stage1_options
_log = read_log


# ---------------------------------------------------------------- 1. layout -> loss


def _brute_force_loss(model, layout) -> float:
    """FLUID_METHOD.md 3.4 written out with loops: a float mask, the model, a hand-summed CE."""
    n = len(layout)
    mask = torch.full((1, 1, n, n), torch.finfo(torch.float32).min)
    for q in range(n):
        for k in range(n):
            main_key = not layout.is_mask[k] and layout.anchor_ids[k] <= layout.anchor_ids[q]
            same_block = (layout.is_mask[k] and layout.is_mask[q] and layout.anchor_ids[k] == layout.anchor_ids[q]
                          and layout.position_ids[k] <= layout.position_ids[q])
            if main_key or same_block:
                mask[0, 0, q, k] = 0.0
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([layout.input_ids]), position_ids=torch.tensor([layout.position_ids]),
                       attention_mask=mask).logits[0]
    total, count = 0.0, 0
    for i in range(n):
        if layout.labels[i] != IGNORE_INDEX:
            row = logits[i].double()
            total += float(torch.logsumexp(row, 0) - row[layout.labels[i]])
            count += 1
    return total / count


def test_stage1_loss_equals_brute_force_rule(tiny_model_dir, chat_file):
    folder = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    example = build_examples(read_conversations(str(chat_file), limit=1), tokenizer, max_len=64)[0]
    kwargs = dict(mask_token_id=3, k_max=4, vocab_size=len(tokenizer), special_ids=tokenizer.all_special_ids)
    masks_last = build_layout(example.input_ids, example.labels, rng=np.random.default_rng(7), **kwargs)
    interleaved = build_layout(example.input_ids, example.labels, rng=np.random.default_rng(7), masks_last=False,
                               **kwargs)
    assert masks_last.is_mask.any() and masks_last.restored.any()

    eager = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    brute = _brute_force_loss(eager, interleaved)

    sdpa = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    batch = collate([masks_last], tokenizer.pad_token_id)
    with torch.no_grad():
        s_ar, s_diff, n_ar, n_diff = FluidLossModule(sdpa)(batch.input_ids, batch.position_ids, sdpa_mask(batch),
                                                           batch.labels, batch.is_mask)
    ours = float((s_ar + s_diff) / (n_ar + n_diff))
    assert ours == pytest.approx(brute, rel=1e-5, abs=1e-5)
    # main tokens see only main tokens, causally: their loss is the plain AR loss of the model
    with torch.no_grad():
        plain = sdpa(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels])).loss
    assert float(s_ar / n_ar) == pytest.approx(float(plain), rel=1e-5)


def _example_and_random_adapter(tiny_model_dir, chat_file):
    """A tiny llama's tokenizer, one chat example, and a LoRA model whose B factors are random,
    so the adapted model differs from its base."""
    from backends.torch_backend.training.model import attach_lora

    folder = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    example = build_examples(read_conversations(str(chat_file), limit=1), tokenizer, max_len=64)[0]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    lora = attach_lora(model, rank=4, alpha=8, dropout=0.0, mask_token_id=3, train_mask_embedding=False).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return tokenizer, example, lora


def _both_layouts(tokenizer, example):
    """The example expanded masks-last and interleaved: each layout, its batch and the loss
    module's arguments."""
    kwargs = dict(mask_token_id=3, k_max=4, vocab_size=len(tokenizer), special_ids=tokenizer.all_special_ids)
    for masks_last in (True, False):
        layout = build_layout(example.input_ids, example.labels, rng=np.random.default_rng(5),
                              masks_last=masks_last, **kwargs)
        batch = collate([layout], tokenizer.pad_token_id)
        yield layout, batch, (batch.input_ids, batch.position_ids, sdpa_mask(batch), batch.labels, batch.is_mask)


def test_kl_ar_loss_is_soft_cross_entropy_against_the_adapter_free_model(tiny_model_dir, chat_file):
    """``--ar-loss kl``: main tokens learn the frozen base's next-token distribution. Checked
    against a plain causal forward of the unexpanded example, for the masks-last layout (the
    prefix shortcut) and the interleaved one (the full expanded pass)."""
    tokenizer, example, lora = _example_and_random_adapter(tiny_model_dir, chat_file)
    ids = torch.tensor([example.input_ids])
    scored = torch.tensor([label != IGNORE_INDEX for label in example.labels[1:]])
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits[0, :-1][scored].double()
        with lora.disable_adapter():
            base = lora(input_ids=ids).logits[0, :-1][scored].double()
    expected = float(-(base.softmax(-1) * adapted.log_softmax(-1)).sum())
    hard = float(torch.nn.functional.cross_entropy(adapted, ids[0, 1:][scored], reduction="sum"))
    assert abs(expected - hard) > 1e-3  # the two losses differ, so the check below can fail

    for _, _, args in _both_layouts(tokenizer, example):
        s_ar, s_diff, n_ar, _ = FluidLossModule(lora, ar_loss="kl")(*args)
        ce_ar, ce_diff, _, _ = FluidLossModule(lora, ar_loss="ce")(*args)
        assert int(n_ar) == int(scored.sum())
        assert float(s_ar) == pytest.approx(expected, rel=1e-5)
        assert float(ce_ar) == pytest.approx(hard, rel=1e-5)
        assert float(s_diff) == pytest.approx(float(ce_diff), rel=1e-6)
        s_ar.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_" in n)
        lora.zero_grad()


def test_kl_mask_loss_is_soft_cross_entropy_against_the_main_token_at_that_position(tiny_model_dir, chat_file):
    """``--mask-loss kl``: each labelled mask slot learns the model's own next-token
    distribution at the main token of its position (the ``p`` a sampled draft is verified
    against). Checked slot by slot against the expanded forward's logits, for both layouts;
    the gradient reaches the slots only (the target is detached)."""
    tokenizer, example, lora = _example_and_random_adapter(tiny_model_dir, chat_file)
    for layout, batch, args in _both_layouts(tokenizer, example):
        logits = lora(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      attention_mask=sdpa_mask(batch)).logits[0].double()
        main_at = {int(layout.position_ids[i]): i for i in range(len(layout)) if not layout.is_mask[i]}
        expected, hard, slots = 0.0, 0.0, 0
        for i in range(len(layout)):
            if layout.is_mask[i] and layout.labels[i] != IGNORE_INDEX:
                target = logits[main_at[int(layout.position_ids[i])]].softmax(-1).detach()
                expected = expected - (target * logits[i].log_softmax(-1)).sum()
                hard -= float(logits[i].log_softmax(-1)[int(layout.labels[i])])
                slots += 1
        assert slots > 0 and abs(float(expected) - hard) > 1e-3  # soft and hard differ, so the check can fail
        lora.zero_grad()
        expected.backward()
        want = {n: p.grad.double() for n, p in lora.named_parameters() if "lora_" in n and p.grad is not None}
        assert want and any(g.abs().sum() > 0 for g in want.values())
        lora.zero_grad()
        s_ar, s_diff, _, n_diff = FluidLossModule(lora, mask_loss="kl")(*args)
        ce_ar, ce_diff, _, _ = FluidLossModule(lora, mask_loss="ce")(*args)
        assert int(n_diff) == slots
        assert float(s_diff) == pytest.approx(float(expected), rel=1e-5)
        assert float(ce_diff) == pytest.approx(hard, rel=1e-5)
        assert float(s_ar) == float(ce_ar)  # main tokens keep their own loss
        s_diff.backward()  # the same gradient: none flows into the main tokens' target
        for name, param in lora.named_parameters():
            if name in want:
                assert torch.allclose(param.grad.double(), want[name], rtol=1e-3,
                                      atol=1e-4 * float(want[name].abs().max())), name
        lora.zero_grad()


def test_flex_block_mask_matches_sdpa_mask(tiny_model_dir, chat_file):
    """flex_attention has no backward pass on the CPU (torch 2.13), so gradients cannot be
    compared here: the BlockMask's mask_mod, materialised, equals the SDPA mask bit for bit,
    and a forward through transformers' flex_attention gives the SDPA loss."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    folder = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = build_examples(read_conversations(str(chat_file), limit=3), tokenizer, max_len=64)
    layouts = [build_layout(e.input_ids, e.labels, mask_token_id=3, k_max=4, rng=np.random.default_rng(i),
                            vocab_size=len(tokenizer)) for i, e in enumerate(examples)]
    batch = collate(layouts, tokenizer.pad_token_id)
    rows, width = batch.input_ids.shape
    dense = create_mask(mask_mod_for(batch), rows, 1, width, width, device="cpu")
    assert torch.equal(dense, sdpa_mask(batch))
    block = create_block_mask(mask_mod_for(batch), rows, None, width, width, device="cpu", BLOCK_SIZE=16)
    assert block.sparsity() > 0

    losses = {}
    for impl, mask in (("sdpa", sdpa_mask(batch)), ("flex_attention", block)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=impl).eval()
        with torch.no_grad():
            s_ar, s_diff, n_ar, n_diff = FluidLossModule(model)(batch.input_ids, batch.position_ids, mask,
                                                                batch.labels, batch.is_mask)
        losses[impl] = (float(s_ar / n_ar), float(s_diff / n_diff))
    assert losses["flex_attention"] == pytest.approx(losses["sdpa"], rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention has no backward pass on the CPU")
def test_flex_and_sdpa_give_the_same_loss_and_gradients_on_cuda(tiny_model_dir, chat_file):
    from backends.torch_backend.training.masks import flex_block_mask

    folder = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = build_examples(read_conversations(str(chat_file), limit=3), tokenizer, max_len=64)
    layouts = [build_layout(e.input_ids, e.labels, mask_token_id=3, k_max=4, rng=np.random.default_rng(i),
                            vocab_size=len(tokenizer)) for i, e in enumerate(examples)]
    batch = collate(layouts, tokenizer.pad_token_id, pad_to_multiple=128).to("cuda")
    results = {}
    for impl, mask in (("sdpa", sdpa_mask(batch)), ("flex_attention", flex_block_mask(batch))):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=impl).cuda()
        s_ar, s_diff, n_ar, n_diff = FluidLossModule(model)(batch.input_ids, batch.position_ids, mask,
                                                            batch.labels, batch.is_mask)
        loss = (s_ar + s_diff) / (n_ar + n_diff)
        loss.backward()
        results[impl] = (float(loss), {n: p.grad.detach().cpu() for n, p in model.named_parameters()})
    assert results["flex_attention"][0] == pytest.approx(results["sdpa"][0], rel=1e-5)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["flex_attention"][1][name], grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------- 2. training lowers losses; stage II


def test_stage1_lowers_both_losses_and_stage2_touches_only_the_head(tiny_model_dir, chat_file, tmp_path):
    base = tiny_model_dir("llama")
    out = tmp_path / "stage1"
    summary = run_stage1(_opts(base, chat_file, out, steps=50, warmup_ratio=0.1))
    assert summary["steps"] == 50
    log = _log(out)
    first, last = log[:5], log[-5:]
    for key in ("loss_ar", "loss_diff"):
        before, after = np.mean([r[key] for r in first]), np.mean([r[key] for r in last])
        assert after < before - 0.5, (key, before, after)
    config = json.loads((out / "fluid_config.json").read_text())
    assert config["mask_token_id"] == 3 and config["k_max"] == 4 and config["base_model"] == str(base)
    assert (out / "adapter_model.safetensors").exists()

    import fluid_app

    model = fluid_app.load(str(out), backend="torch", device="cpu")
    ar = model.generate("Paris is", mode="ar", max_new_tokens=16)
    fluid = model.generate("Paris is", mode="fluid", max_new_tokens=16, k_min=1)
    assert fluid.token_ids == ar.token_ids

    backbone_before = {k: v.clone() for k, v in model.backend.model.state_dict().items()}
    stage2 = tmp_path / "stage2"
    (out / "adapter_model.safetensors").chmod(0o600)  # as older versions left it: the copy must not keep it
    result = run_stage2(Stage2Options(model=str(out), data=str(chat_file), out=str(stage2), steps=5, tau=6.0,
                                      max_len=96, device="cpu", progress=False))
    assert result["last"]["anchors"] > 0
    head = load_file(str(stage2 / "k_head.safetensors"))
    assert set(head) == {"proj.weight", "proj.bias", "out.weight", "out.bias"} and head["out.weight"].shape[0] == 4
    adapter = load_file(str(out / "adapter_model.safetensors"))
    copied = load_file(str(stage2 / "adapter_model.safetensors"))
    assert copied.keys() == adapter.keys() and all(torch.equal(copied[k], adapter[k]) for k in adapter)
    loaded = fluid_app.load(str(stage2), backend="torch", device="cpu")
    assert loaded.backend.has_k_head and loaded.config.tau == 6.0
    after = loaded.backend.model.state_dict()
    assert all(torch.equal(backbone_before[k], after[k]) for k in backbone_before)
    assert loaded.generate("Paris is", mode="fluid", max_new_tokens=16).token_ids == ar.token_ids
    _assert_ordinary_modes(stage2, "adapter_model.safetensors", "k_head.safetensors")


def test_kl_ar_loss_with_a_heavy_weight_keeps_the_model_near_its_base(tiny_model_dir, chat_file, tmp_path):
    """The knobs the embedded default is trained with: the same steps with ``--ar-loss kl
    --ar-weight 4`` move the adapted model's next-token distribution less from the base's
    than plain ``ce`` does, and the mask loss still falls."""
    from peft import PeftModel

    base = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(base)
    example = build_examples(read_conversations(str(chat_file), limit=1), tokenizer, max_len=64)[0]
    ids = torch.tensor([example.input_ids])
    drift = {}
    for name, over in (("ce", {}), ("kl", dict(ar_loss="kl", ar_weight=4.0))):
        out = tmp_path / name
        run_stage1(_opts(base, chat_file, out, steps=30, **over))
        log = _log(out)
        assert np.mean([r["loss_diff"] for r in log[-5:]]) < np.mean([r["loss_diff"] for r in log[:5]]) - 0.3
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(model, str(out)).eval()
        with torch.no_grad():
            after = adapted(input_ids=ids).logits.log_softmax(-1)
            with adapted.disable_adapter():
                before = adapted(input_ids=ids).logits.log_softmax(-1)
        drift[name] = float((before.exp() * (before - after)).sum(-1).mean())  # KL(base || adapted)
    assert drift["kl"] < drift["ce"] / 2, drift


def test_added_mask_token_checkpoint_loads_and_decodes(tiny_model_dir, chat_file, tmp_path):
    """A base without an unused special token: the MASK token is added, its embedding row is
    trained and saved with the adapter, and loading adds and resizes before applying it."""
    import shutil

    import fluid_app
    from fluid_app.hf_config import unused_special_token

    base = tmp_path / "no-spare-token"
    shutil.copytree(tiny_model_dir("llama"), base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template += "{# <|unused|> is taken #}"
    tokenizer.save_pretrained(base)
    assert unused_special_token(AutoTokenizer.from_pretrained(base)) is None
    out = tmp_path / "added"
    run_stage1(_opts(base, chat_file, out, steps=3))
    config = json.loads((out / "fluid_config.json").read_text())
    assert config["mask_token_id"] == len(tokenizer)
    assert any("trainable_tokens" in k for k in load_file(str(out / "adapter_model.safetensors")))
    model = fluid_app.load(str(out), backend="torch", device="cpu")
    assert model.backend.model.get_input_embeddings().weight.shape[0] == len(tokenizer) + 1
    again = fluid_app.load(str(out), backend="torch", device="cpu")
    assert torch.equal(model.backend.model.get_output_embeddings().weight,
                       again.backend.model.get_output_embeddings().weight)
    ar = model.generate("Paris is", mode="ar", max_new_tokens=12)
    assert model.generate("Paris is", mode="fluid", max_new_tokens=12, k_min=1).token_ids == ar.token_ids


def test_a_run_started_from_an_adapter_starts_where_that_adapter_ends(tiny_model_dir, chat_file, tmp_path, capsys):
    """``--init-adapter``: the new adapter computes what the finished one does, through peft's own
    loading, at the same rank and at a larger rank with another alpha / r (old factors in the
    first ranks, the rest adding nothing yet, B rescaled); a run from it trains on from there."""
    from peft import PeftModel

    base = tiny_model_dir("llama")
    first = tmp_path / "first"
    run_stage1(_opts(base, chat_file, first, steps=6, lora_rank=4, lora_alpha=8))
    ids = torch.tensor([[5, 9, 11, 7, 3, 12, 3, 3]])
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), first)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert not torch.allclose(reference, plain, atol=1e-3)  # six steps moved the model: the check has teeth
    for rank, alpha in ((4, 8), (16, 4)):
        torch.manual_seed(1)
        model = attach_lora(AutoModelForCausalLM.from_pretrained(base), rank=rank, alpha=alpha, dropout=0.0,
                            mask_token_id=3, train_mask_embedding=False)
        assert start_from_adapter(model, first, rank=rank, alpha=alpha) == len(
            [k for k in load_file(str(first / "adapter_model.safetensors")) if ".lora_A." in k])
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, reference, atol=1e-5), (rank, alpha)
        extra_a = [m.lora_A["default"].weight[4:] for m in model.modules() if hasattr(m, "lora_A")
                   and "default" in m.lora_A]
        assert rank == 4 or all(a.abs().sum() > 0 for a in extra_a)  # new ranks can learn: A is not zero
    # a run from it: after one step at a negligible learning rate it still computes the same
    grown = tmp_path / "grown"
    summary = run_stage1(_opts(base, chat_file, grown, steps=1, lr=1e-12, lora_rank=16, lora_alpha=4,
                               init_adapter=str(first)))
    assert summary["steps"] == 1
    with torch.no_grad():
        again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), grown)(ids).logits
    assert torch.allclose(again, reference, atol=1e-5)
    assert json.loads((grown / "fluid_config.json").read_text())["extra"]["stage1"]["init_adapter"] == str(first)
    # refused with one line each: a smaller rank, a model without an adapter, and full fine-tuning
    args = ["train", "stage1", "--base", str(base), "--data", str(chat_file), "--steps", "1", "--k-max", "4",
            "--max-len", "64", "--device", "cpu", "--no-progress"]
    for extra, words, out in ((["--lora-rank", "2", "--init-adapter", str(first)], "pass --lora-rank 4 or more", "a"),
                              (["--init-adapter", str(base)], "has no LoRA adapter to start from", "b"),
                              (["--full", "--init-adapter", str(first)], "drop --full or --init-adapter", "c")):
        _assert_clean_error(_cli(capsys, *args, "--out", str(tmp_path / out), *extra), tmp_path / out, words)


def test_grad_accumulation_and_checkpointing_take_the_same_steps(tiny_model_dir, chat_file, tmp_path):
    """The loss is normalised over the whole global batch, so 1x2 examples, 2x1 accumulated
    and 2x1 with gradient checkpointing make the same updates."""
    base = tiny_model_dir("llama")
    runs = {"b2": dict(batch_size=2), "accum": dict(batch_size=1, grad_accum=2),
            "ckpt": dict(batch_size=1, grad_accum=2, gradient_checkpointing=True)}
    logs = {}
    for name, extra in runs.items():
        run_stage1(_opts(base, chat_file, tmp_path / name, steps=3, max_len=64, **extra))
        logs[name] = _log(tmp_path / name)
    for name in ("accum", "ckpt"):
        for x, y in zip(logs["b2"], logs[name]):
            assert abs(x["loss_ar"] - y["loss_ar"]) < 1e-5 and abs(x["loss_diff"] - y["loss_diff"]) < 1e-5, name
    assert logs["b2"][2]["loss"] != logs["b2"][0]["loss"]


def test_stage2_on_a_plain_model_writes_a_head_only_checkpoint(tiny_model_dir, chat_file, tmp_path):
    import fluid_app

    base = tiny_model_dir("llama")
    out = tmp_path / "head-only"
    run_stage2(Stage2Options(model=str(base), data=str(chat_file), out=str(out), k_max=4, steps=2, max_len=64,
                             device="cpu", progress=False))
    assert sorted(p.name for p in out.iterdir()) == ["fluid_config.json", "k_head.safetensors", "stage2_log.jsonl"]
    _assert_ordinary_modes(out, "k_head.safetensors")
    assert [json.loads(line)["step"] for line in (out / "stage2_log.jsonl").read_text().splitlines()] == [1, 2]
    model = fluid_app.load(str(out), backend="torch", device="cpu")
    assert model.backend.has_k_head and model.config.k_max == 4 and model.config.base_model == str(base)
    ar = model.generate("Paris is", mode="ar", max_new_tokens=12)
    assert model.generate("Paris is", mode="fluid", max_new_tokens=12).token_ids == ar.token_ids


# ------------------------------------------------------------------------ 3. resume


def test_resume_reproduces_an_uninterrupted_run(tiny_model_dir, chat_file, tmp_path):
    base = tiny_model_dir("llama")
    straight = tmp_path / "straight"
    run_stage1(_opts(base, chat_file, straight, steps=20, warmup_ratio=0.1))
    split = tmp_path / "split"
    run_stage1(_opts(base, chat_file, split, steps=20, warmup_ratio=0.1, stop_at_step=10))
    assert not (split / "fluid_config.json").exists()  # stopped: no final checkpoint yet
    step_folder = split / "checkpoints" / "step-0000010"
    assert (step_folder / "trainer_state.json").exists()
    assert not list(split.rglob("*.pt"))  # the training state is safetensors + JSON: nothing to unpickle
    state_files = {"optimizer.safetensors", "optimizer.json", "rng-rank0.safetensors", "rng-rank0.json"}
    assert state_files <= {p.name for p in step_folder.iterdir()}
    import fluid_app

    assert fluid_app.load(str(step_folder), backend="torch", device="cpu").config.k_max == 4
    with open(split / "train_log.jsonl", "a") as log:  # killed while logging step 11: a torn last line
        log.write('{"step": 11, "loss_ar": 2.')
    run_stage1(_opts(base, chat_file, split, steps=20, warmup_ratio=0.1, resume="auto"))
    a, b = _log(straight), _log(split)
    assert [r["step"] for r in b] == list(range(1, 21))
    for x, y in zip(a, b):
        assert (x["loss_ar"], x["loss_diff"], x["lr"]) == pytest.approx((y["loss_ar"], y["loss_diff"], y["lr"]),
                                                                         rel=1e-6, abs=1e-7)
    lora_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(load_file(str(straight / "adapter_model.safetensors"))[lora_a],
                       load_file(str(split / "adapter_model.safetensors"))[lora_a])
    _assert_ordinary_modes(straight, "adapter_model.safetensors")
    _assert_ordinary_modes(split, "adapter_model.safetensors", "trainable.safetensors")


def _assert_ordinary_modes(folder: Path, *names: str) -> None:
    """Every file and folder (``names`` among them) has the mode ``open``/``mkdir`` would
    give, not the owner-only 0600 that safetensors' own writer leaves."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [folder, *folder.rglob("*")]
    assert set(names) <= {p.name for p in paths}
    for path in paths:
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path


# ----------------------------------------------------------------------- 7. bad input


def _assert_clean_error(result, out: Path, words: str) -> None:
    returncode, stderr = result
    assert returncode == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], stderr
    assert "Traceback" not in stderr
    assert not (out / "fluid_config.json").exists()
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def _cli(capsys, *args: str) -> tuple[int, str]:
    """The CLI's own entry point in-process (one subprocess run below shows the real thing)."""
    from fluid_app.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def test_bad_inputs_give_one_line_errors(tiny_model_dir, chat_file, tmp_path, capsys):
    base = tiny_model_dir("llama")
    out = tmp_path / "out"
    args = ["train", "stage1", "--base", str(base), "--out", str(out), "--steps", "2", "--k-max", "4",
            "--device", "cpu", "--no-progress"]
    missing = run_cli(*args, "--data", str(tmp_path / "missing.jsonl"), "--max-len", "64")
    _assert_clean_error((missing.returncode, missing.stderr), out, "not found")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply here"}]}) + "\n")
    _assert_clean_error(_cli(capsys, *args, "--data", str(empty), "--max-len", "64"), out,
                        "no training examples left")
    _assert_clean_error(_cli(capsys, *args, "--data", str(chat_file), "--max-len", "4096"), out,
                        "longer than the model context")
    # a resumable run from one base, resumed with another: refused before anything is written
    other = tiny_model_dir("qwen2")
    assert _cli(capsys, *args, "--data", str(chat_file), "--max-len", "64", "--stop-at-step", "1")[0] == 0
    before = sorted(p.name for p in out.rglob("*"))
    resumed = _cli(capsys, "train", "stage1", "--base", str(other), "--out", str(out), "--steps", "2", "--k-max",
                   "4", "--device", "cpu", "--data", str(chat_file), "--max-len", "64", "--resume")
    returncode, stderr = resumed
    assert returncode == 2 and "was trained from base" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out.rglob("*")) == before and not (out / "fluid_config.json").exists()
    _assert_clean_error(_cli(capsys, "train", "stage2", "--model", str(tmp_path / "nope"), "--data", str(chat_file),
                             "--out", str(tmp_path / "s2"), "--device", "cpu"), tmp_path / "s2", "not found")


# ----------------------------------------------------------------------- throughput


def test_throughput_script_runs_on_a_tiny_config():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "backends.torch_backend.training.throughput", "--tiny",
                             "--steps", "2", "--warmup", "1", "--json"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fluid_tokens_per_s"] > 0 and report["causal_tokens_per_s"] > 0
    assert math.isfinite(report["ratio"]) and report["expanded_length"] > report["seq_len"]
