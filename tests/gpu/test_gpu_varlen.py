"""Padding-free without flash-attn on a real GPU: the packed row's attention on torch's varlen kernel, in bf16.

The probe is told flash-attn is absent (the one faked seam: this GPU machine has it installed), so the plugin keeps
SDPA and packs on torch's ``varlen_attn``. The reference is plain transformers, padded, on SDPA. Tolerances as
test_gpu_padding_free.py (bf16). Needs a CUDA GPU of sm >= 8.0 and a torch with torch.nn.attention.varlen.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import transformers

import panovlm_flashpatch
from panovlm_flashpatch import backends, tiny
from panovlm_flashpatch import probe as probe_module
from panovlm_flashpatch.runtime import varlen

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0) or varlen.kernel() is None:
    pytest.skip("needs a CUDA GPU (sm >= 8.0) and torch.nn.attention.varlen", allow_module_level=True)

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=4, vocab_size=512)
LENGTHS = (200, 37, 128, 5, 256, 90)
FAMILIES = {"qwen3": {}, "llama": {}, "mistral": {"sliding_window": 64}, "gemma3_text": {"sliding_window": 64},
            "phi3": {}}


def batch(side):
    torch.manual_seed(5)
    width = max(LENGTHS)
    ids = torch.randint(0, 512, (len(LENGTHS), width))
    mask = tiny.padding_mask(LENGTHS, width, side)
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(len(LENGTHS)), mask.argmax(1)] = -100
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": labels.cuda()}


def step(model, data):
    model.zero_grad(set_to_none=True)
    out = model(**data)
    out.loss.backward()
    return out.loss.float().item(), out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.fixture
def no_flash_attn(monkeypatch):
    real = probe_module.probe()
    absent = dataclasses.replace(real, flash_attn_version=None, flash_attn_error="flash-attn hidden by the test")
    monkeypatch.setattr(probe_module, "probe", lambda devices=None: absent)
    panovlm_flashpatch.remove()
    yield
    panovlm_flashpatch.remove()


@pytest.fixture
def kernel_calls(monkeypatch):
    from torch.nn.attention import varlen as torch_varlen

    calls, real = [], torch_varlen.varlen_attn

    @functools.wraps(real)  # the plugin reads the kernel's signature (which arguments this torch's kernel takes)
    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_varlen, "varlen_attn", counted)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_packed_on_torch_varlen_matches_padded_sdpa(tmp_path, no_flash_attn, kernel_calls, family, side, checkpointing):
    overrides = {**SHAPE, **FAMILIES[family]}
    if family == "qwen3":
        path = tiny.build_lm(str(tmp_path / family), **overrides)
    else:
        if not tiny.has_family(family):
            pytest.skip(f"no {family} in this transformers")
        path = tiny.build_causal_lm(str(tmp_path / family), family, **overrides)
    kwargs = dict(device_map="cuda", dtype=torch.bfloat16)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs).train()
    # bf16's own noise, per family: plain transformers' eager against its SDPA on the same batch (Gemma 3's
    # scaled embeddings: 5.7% on the worst gradient, measured on the CPU, where float32 agrees to 1e-6).
    eager = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs).train()
    assert panovlm_flashpatch.apply()  # the default: padding-free auto
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).train()
    record = panovlm_flashpatch.report(model)[0]
    assert record["by_phase"][backends.PADDED]["backend"] == backends.SDPA_VARLEN, record["by_phase"]
    if checkpointing:
        for m in (reference, model):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = batch(side)
    ref_loss, ref_logits, ref_grads = step(reference, data)
    noise = {n: (g - ref_grads[n]).norm().item() for n, g in step(eager, data)[2].items()}
    loss, logits, grads = step(model, data)
    layers = model.config.num_hidden_layers
    assert len(kernel_calls) == layers * (2 if checkpointing else 1), len(kernel_calls)
    assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss), (loss, ref_loss)
    real = data["attention_mask"].bool()
    diff = (logits[real] - ref_logits[real]).abs().max().item()
    assert diff <= 5e-2 * ref_logits[real].abs().max(), (diff, ref_logits[real].abs().max().item())
    floor = 1e-3 * max(g.norm().item() for g in ref_grads.values())  # a gradient that is 0 in truth holds noise
    for name, ref in ref_grads.items():
        err = (grads[name] - ref).norm().item()
        assert err <= max(5e-2 * max(ref.norm().item(), floor), 2 * noise[name]), (name, err, ref.norm().item(),
                                                                                   noise[name])


def test_a_llava_packs_on_torch_varlen(tmp_path, no_flash_attn, kernel_calls):
    from test_padding_free_families import llava_batch

    path = tiny.build_llava(str(tmp_path / "llava"), vision="siglip")
    kwargs = dict(device_map="cuda", dtype=torch.bfloat16)
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(path, **kwargs).train()
    assert panovlm_flashpatch.apply()
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, **kwargs).train()
    data = {k: v.cuda() for k, v in llava_batch("right").items()}
    data["pixel_values"] = data["pixel_values"].to(torch.bfloat16)
    losses = []
    for m in (reference, model):
        out = m(**data, use_cache=False)
        out.loss.backward()
        losses.append(out.loss.float().item())
    assert kernel_calls, "the packed LLaVA forward did not reach torch's varlen kernel"
    assert abs(losses[1] - losses[0]) <= 1e-2 * abs(losses[0])
