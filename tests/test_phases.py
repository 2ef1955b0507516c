"""generate() on SDPA for models on FlashAttention-2: the switch, its restore, its opt-out.

On CPU no model ends on FlashAttention-2, so the machinery is driven with eager/sdpa stand-ins
through the real set_attn_implementation (transformers >= 4.54); tests/gpu checks the real case.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.utils import GenerationMixin

import panovlm_flashpatch
from panovlm_flashpatch import phases, tiny

from conftest import TV

needs_switch = pytest.mark.skipif(TV < (4, 54), reason="set_attn_implementation exists from transformers 4.54")


def test_plan_only_for_models_on_fa2():
    assert phases.plan_for({"": "sdpa"}, composite=False) is None
    assert phases.plan_for({"": "flash_attention_2"}, composite=False) == phases.SwitchPlan("sdpa", "flash_attention_2")
    plan = phases.plan_for({"text_config": "flash_attention_2", "vision_config": "sdpa"}, composite=True)
    assert plan.during == {"text_config": "sdpa", "vision_config": "sdpa"}
    assert plan.after == {"text_config": "flash_attention_2", "vision_config": "sdpa"}


def test_apply_and_remove_wrap_and_restore_generate():
    original = GenerationMixin.__dict__["generate"]
    panovlm_flashpatch.apply()
    panovlm_flashpatch.apply()
    wrapper = GenerationMixin.__dict__["generate"]
    assert wrapper is not original and wrapper.__wrapped__ is original
    panovlm_flashpatch.remove()
    assert GenerationMixin.__dict__["generate"] is original


def backend_seen_during_generate(model, **kwargs):
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    try:
        with torch.no_grad():
            model.generate(**tiny.lm_inputs(batch=1, length=4), max_new_tokens=2, do_sample=False, pad_token_id=0, **kwargs)
    finally:
        handle.remove()
    return set(seen)


@needs_switch
def test_armed_model_generates_on_the_switched_backend_and_is_restored(patched, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert not phases.is_armed(model)  # CPU: nothing on FlashAttention-2, nothing armed
    assert backend_seen_during_generate(model) == {"sdpa"}
    assert phases.arm(model, phases.SwitchPlan(during="eager", after="sdpa"))
    assert backend_seen_during_generate(model) == {"eager"}
    assert model.config._attn_implementation == "sdpa"


@needs_switch
def test_restored_even_when_generate_raises(patched, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    phases.arm(model, phases.SwitchPlan(during="eager", after="sdpa"))
    with pytest.raises(Exception):
        model.generate(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=-5)
    assert model.config._attn_implementation == "sdpa"


@needs_switch
def test_generate_fa2_setting_keeps_the_loaded_backend(patched, ckpts, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    phases.arm(model, phases.SwitchPlan(during="eager", after="sdpa"))
    monkeypatch.setenv("PANOVLM_FLASHPATCH_GENERATE_FA2", "1")
    assert backend_seen_during_generate(model) == {"sdpa"}


def test_unarmed_models_pass_through(patched, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="eager")
    assert backend_seen_during_generate(model) == {"eager"}
