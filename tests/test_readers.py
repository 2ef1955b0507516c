"""transformers code that accepts only backend names it knows gets a plugin-armed model on "sdpa" first
(runtime/readers.py). Continuous batching after packed training on torch's varlen kernel: tests/test_varlen.py.

Trainer's context parallelism (torch's backend) requires SDPA and refuses FlashAttention-2 before the first step, so a
program that trained with it under plain transformers would fail under the plugin. It needs several GPUs; what
Trainer reads of it is its accelerator's ``parallelism_config`` flags, faked here as the capability probe is; the
model, its load and Trainer are real.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import panovlm_flashpatch
from panovlm_flashpatch.runtime import padding_free
from test_padding_free import DecoderSpy, padded_batch

pytestmark = pytest.mark.skipif(not hasattr(transformers.Trainer, "_prepare_context_parallel_inputs"),
                                reason="transformers without Trainer's context parallelism (>= 4.57 has it)")


@pytest.fixture
def trainer_of(monkeypatch, tmp_path):
    """A real Trainer whose accelerator says context parallelism is on (``cp``) on torch's backend."""
    def make(model, cp=True):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
        trainer = transformers.Trainer(model=model, args=args)
        flags = types.SimpleNamespace(cp_enabled=cp, cp_backend="torch")
        monkeypatch.setattr(type(trainer.accelerator), "parallelism_config", property(lambda self: flags))
        return trainer
    return make


def _inputs():
    ids = torch.randint(0, 100, (2, 8))
    return {"input_ids": ids, "labels": ids.clone()}


def test_context_parallelism_gets_the_plugins_flashattention2_model_on_sdpa(emulated, ckpts, trainer_of, caplog):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    assert model.config._attn_implementation == "flash_attention_2" and padding_free.is_armed(model)
    trainer = trainer_of(model)
    with caplog.at_level(logging.WARNING, logger="panovlm_flashpatch"):
        trainer._prepare_context_parallel_inputs(model, _inputs())  # raised ValueError before readers.py
    assert model.config._attn_implementation == "sdpa"
    assert "context parallelism requires SDPA" in caplog.text and "flash_attention_2" in caplog.text
    assert not padding_free.is_armed(model)
    spy = DecoderSpy(model)
    emulated.CALLS.clear()
    model(**padded_batch("right")).loss.backward()
    assert not emulated.CALLS and spy.batches == [4], "the model still ran FlashAttention-2 or packed"
    trainer._prepare_context_parallel_inputs(model, _inputs())  # once on SDPA, nothing more happens
    assert caplog.text.count("context parallelism requires SDPA") == 1


def test_a_flashattention2_the_caller_chose_meets_transformers_own_error(emulated, ckpts, trainer_of):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="Context parallelism is supported only with SDPA"):
        trainer_of(model)._prepare_context_parallel_inputs(model, _inputs())
    assert model.config._attn_implementation == "flash_attention_2"


def test_without_context_parallelism_nothing_changes(emulated, ckpts, trainer_of):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16)
    trainer = trainer_of(model, cp=False)
    trainer._prepare_context_parallel_inputs(model, _inputs())
    assert model.config._attn_implementation == "flash_attention_2" and padding_free.is_armed(model)


def test_remove_takes_the_wrapper_away(emulated, ckpts, trainer_of):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16)
    panovlm_flashpatch.remove()
    with pytest.raises(ValueError, match="Context parallelism is supported only with SDPA"):
        trainer_of(model)._prepare_context_parallel_inputs(model, _inputs())
