"""Padding-free on a real GPU: FlashAttention-2 (varlen kernel) on the packed row, in bf16.

The reference is plain transformers on the same weights, padded, on FlashAttention-2 and on SDPA.
bf16 tolerance: loss within 1e-2 relative, each gradient within 5e-2 of its norm (relative error of
bf16 operands lands between 1e-3 and 1e-2 per operation; a backward pass compounds a few).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import panovlm_flashpatch
from panovlm_flashpatch import tiny
from panovlm_flashpatch.runtime import padding_free

from gpu.conftest import skip_without_fa2

pytestmark = pytest.mark.gpu
skip_without_fa2()

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=4, vocab_size=512)
LENGTHS = (200, 37, 128, 5, 256, 90)


def batch(side: str):
    torch.manual_seed(5)
    width = max(LENGTHS)
    ids = torch.randint(0, 512, (len(LENGTHS), width))
    mask = tiny.padding_mask(LENGTHS, width, side)
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(len(LENGTHS)), mask.argmax(1)] = -100  # first real label ignored (left padding needs it)
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": labels.cuda()}


def step(model, data, embeds=False):
    model.zero_grad(set_to_none=True)
    call = dict(data)
    if embeds:
        call["inputs_embeds"] = model.get_input_embeddings()(call.pop("input_ids"))
    out = model(**call)
    out.loss.backward()
    return out.loss.float().item(), out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}


def load(path, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cuda", dtype=torch.bfloat16, **kwargs)
    return model.train()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.build_lm(str(tmp_path_factory.mktemp("pf") / "lm"), **SHAPE)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("embeds", [False, True], ids=["input_ids", "inputs_embeds"])
@pytest.mark.parametrize("reference_attn", ["flash_attention_2", "sdpa"])
def test_packed_fa2_matches_padded_in_bf16(ckpt, kernel_calls, side, embeds, reference_attn):
    panovlm_flashpatch.remove()
    reference = load(ckpt, attn_implementation=reference_attn)
    assert panovlm_flashpatch.apply(padding_free=True)
    packed = load(ckpt)
    assert packed.config._attn_implementation == "flash_attention_2"
    assert padding_free.is_armed(packed)
    data = batch(side)
    want = step(reference, data, embeds)
    kernel_calls.clear()
    got = step(packed, data, embeds)
    # One varlen kernel call per layer: the packed row, not a padded batch.
    assert kernel_calls == ["varlen_fwd"] * SHAPE["num_hidden_layers"]
    assert abs(got[0] - want[0]) <= 1e-2 * abs(want[0]), (got[0], want[0])
    real = data["attention_mask"].bool()
    rel = (got[1][real] - want[1][real]).norm() / want[1][real].norm()
    assert rel < 2e-2, rel
    for name, ref in want[2].items():
        err = (got[2][name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 5e-2, (name, err.item())
    panovlm_flashpatch.remove()


def test_boundaries_from_position_ids_equal_explicit_cu_seqlens(ckpt, monkeypatch):
    """The packed call passes cu_seq_lens (saving a nonzero and host syncs per layer); without
    them transformers derives the same boundaries from position_ids: same numbers."""
    assert panovlm_flashpatch.apply(padding_free=True)
    model = load(ckpt)
    data = batch("right")
    fast = step(model, data)
    monkeypatch.setattr(padding_free, "passes_varlen_kwargs", lambda: False)
    slow = step(model, data)
    assert fast[0] == slow[0]
    assert torch.equal(fast[1], slow[1])
    panovlm_flashpatch.remove()


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text", "phi3", "qwen2"])
def test_packed_fa2_matches_padded_for_each_verified_family(tmp_path, kernel_calls, family):
    if not tiny.has_family(family):
        pytest.skip(f"this transformers has no {family}")
    path = tiny.build_causal_lm(str(tmp_path / family), family)
    panovlm_flashpatch.remove()
    reference = load(path, attn_implementation="flash_attention_2")
    assert panovlm_flashpatch.apply()  # the default: FlashAttention-2 forwards are packed
    packed = load(path)
    assert padding_free.is_armed(packed) and packed.config._attn_implementation == "flash_attention_2"
    lengths = (100, 37, 64, 5)
    ids = torch.randint(0, 120, (4, 100), device="cuda")
    mask = tiny.padding_mask(lengths, 100, "right").cuda()
    data = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    want = step(reference, data)
    kernel_calls.clear()
    got = step(packed, data)
    assert kernel_calls and set(kernel_calls) == {"varlen_fwd"}
    assert abs(got[0] - want[0]) <= 1e-2 * abs(want[0]), (got[0], want[0])
    real = mask.bool()
    assert (got[1][real] - want[1][real]).norm() / want[1][real].norm() < 2e-2
    for name, ref in want[2].items():
        assert (got[2][name] - ref).norm() / ref.norm().clamp_min(1e-6) < 5e-2, name
    panovlm_flashpatch.remove()


def test_a_llava_with_a_qwen3_lm_trains_packed_on_fa2(tmp_path, kernel_calls):
    """LLaVA (SigLIP tower, Qwen3 LM), plugin default: the language model on FlashAttention-2, packed at the top
    level; loss and every gradient (the vision tower's too) against plain transformers padded on SDPA."""
    from test_padding_free_families import llava_batch

    path = tiny.build_llava(str(tmp_path / "llava"), vision="siglip")
    kwargs = dict(device_map="cuda", dtype=torch.bfloat16)
    panovlm_flashpatch.remove()
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa",
                                                                           **kwargs).train()
    assert panovlm_flashpatch.apply()
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, **kwargs).train()
    records = {r["component"]: r for r in panovlm_flashpatch.report(model)}
    assert records["text_config"]["backend"] == "flash_attention_2", records["text_config"]
    assert records["text_config"]["padding_free"].startswith("padding-free on"), records["text_config"]
    data = {k: v.cuda() for k, v in llava_batch("right").items()}
    data["pixel_values"] = data["pixel_values"].to(torch.bfloat16)
    results = []
    for m in (reference, model):
        m.zero_grad(set_to_none=True)
        out = m(**data, use_cache=False)
        out.loss.backward()
        results.append((out.loss.float().item(), {n: p.grad.float() for n, p in m.named_parameters()
                                                   if p.grad is not None}))
    panovlm_flashpatch.remove()
    assert "varlen_fwd" in kernel_calls, kernel_calls
    (ref_loss, ref_grads), (loss, grads) = results
    assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys() and any("vision" in n for n in grads)
    # A floor: a gradient that is 0 in truth (a key projection's bias: softmax ignores it) holds bf16 noise in both.
    floor = 1e-3 * max(g.norm().item() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        err = (grads[name] - ref).norm().item()
        assert err <= 5e-2 * max(ref.norm().item(), floor), (name, err, ref.norm().item())
