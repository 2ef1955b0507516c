"""On a real GPU with flash-attn: the plugin's choice really runs FlashAttention-2.

Skipped (not failed) without a CUDA GPU of compute capability >= 8.0 and a working flash-attn,
so CI, which has no GPU, stays green. Run on the GPU machine with ``python -m pytest -m gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import panovlm_flashpatch
from panovlm_flashpatch import tiny

from gpu.conftest import skip_without_fa2

pytestmark = pytest.mark.gpu
skip_without_fa2()

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_language_model_runs_flash_attention_2_in_bf16(applied, tmp_path, kernel_calls):
    path = tiny.build_lm(str(tmp_path / "lm"))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", device_map="cuda")
    (rec,) = panovlm_flashpatch.report(model)
    assert rec["backend"] == "flash_attention_2" and rec["dtype"] == "bfloat16", rec
    assert next(model.parameters()).dtype == torch.bfloat16
    batch = {k: v.cuda() for k, v in tiny.lm_inputs().items()}
    with torch.no_grad():
        model(**batch)
    assert len(kernel_calls) == model.config.num_hidden_layers, kernel_calls


def test_fa2_logits_match_sdpa(applied, tmp_path):
    path = tiny.build_lm(str(tmp_path / "lm"))
    fa2 = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
    assert panovlm_flashpatch.report(fa2)[0]["backend"] == "flash_attention_2"
    panovlm_flashpatch.remove()
    sdpa = AutoModelForCausalLM.from_pretrained(path, device_map="cuda", dtype=torch.bfloat16)
    assert sdpa.config._attn_implementation == "sdpa"
    batch = {k: v.cuda() for k, v in tiny.lm_inputs(batch=2, length=64).items()}
    with torch.no_grad():
        a, b = fa2(**batch).logits.float(), sdpa(**batch).logits.float()
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 2e-2, rel


@pytest.mark.skipif(not tiny.has_siglip2(), reason="needs SigLIP2")
def test_composite_lm_on_fa2_tower_on_its_own_choice_forward_backward(applied, tmp_path, kernel_calls):
    path = tiny.build_llava(str(tmp_path / "llava"), vision="siglip2")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, device_map="cuda")
    records = {r["component"]: r for r in panovlm_flashpatch.report(model)}
    assert records["text_config"]["backend"] == "flash_attention_2"
    vision_supports = panovlm_flashpatch.components.supports_fa2(
        transformers.Siglip2VisionModel, panovlm_flashpatch.compat.transformers_facts()
    )
    assert records["vision_config"]["backend"] == ("flash_attention_2" if vision_supports else "sdpa")
    batch = {k: v.cuda() for k, v in tiny.lm_inputs(length=16).items()}
    out = model.model.language_model(**batch)
    out.last_hidden_state.float().pow(2).mean().backward()
    assert kernel_calls.count("fwd") + kernel_calls.count("varlen_fwd") >= model.config.text_config.num_hidden_layers


def test_demo_shows_flash_attention_2_for_the_language_model():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    records = json.loads(out)
    lms = [r for r in records if r["role"] == "language model"]
    assert lms and all(r["backend"] == "flash_attention_2" and r["dtype"] == "bfloat16" for r in lms), lms


@pytest.mark.parametrize("builder, expected", [("build_siglip_vision", "flash_attention_2"), ("build_siglip2_vision", None)])
def test_vision_encoders_on_gpu(applied, tmp_path, builder, expected, monkeypatch):
    if builder == "build_siglip2_vision" and not tiny.has_siglip2():
        pytest.skip("needs SigLIP2")
    default = transformers.AutoModel.from_pretrained(getattr(tiny, builder)(str(tmp_path / "d")), device_map="cuda")
    (rec,) = panovlm_flashpatch.report(default)
    assert rec["backend"] == "sdpa" and "encoders keep SDPA" in rec["reason"], rec
    monkeypatch.setenv("PANOVLM_FLASHPATCH_ENCODERS_FA2", "1")
    model = transformers.AutoModel.from_pretrained(getattr(tiny, builder)(str(tmp_path / "v")), device_map="cuda")
    (rec,) = panovlm_flashpatch.report(model)
    supported = panovlm_flashpatch.components.supports_fa2(type(model), panovlm_flashpatch.compat.transformers_facts())
    assert rec["backend"] == ("flash_attention_2" if supported else "sdpa"), rec
    if expected:
        assert supported, f"{type(model).__name__} should support FlashAttention-2 here"
    if not supported:
        assert "does not support FlashAttention-2" in rec["reason"]


class _TrueOnTheClassOnly:
    """Reads True on the class (what the plugin checks) and False on the instance (what transformers
    checks in __init__): transformers then refuses FlashAttention-2 after the plugin chose it."""

    def __get__(self, instance, owner):
        return instance is None


def test_a_refused_attempt_on_the_gpu_leaves_no_memory_behind(applied, tmp_path):
    path = tiny.build_lm(str(tmp_path / "lm"), hidden_size=512, intermediate_size=1024, head_dim=64, num_attention_heads=8)
    base = type(AutoModelForCausalLM.from_config(tiny.lm_config()))
    liar = type("RefusingLM", (base,), {"_supports_flash_attn": _TrueOnTheClassOnly(), "_supports_flash_attn_2": _TrueOnTheClassOnly()})
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = liar.from_pretrained(path, device_map="cuda")
    (rec,) = panovlm_flashpatch.report(model)
    assert rec["retried"] and rec["backend"] == "sdpa" and rec["attempts"][0]["attn_implementation"] == "flash_attention_2"
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    del model
    torch.cuda.synchronize()
    # Only the final model was ever on the GPU: nothing of the refused attempt is left once it is gone.
    assert torch.cuda.memory_allocated() == before, (before, torch.cuda.memory_allocated(), weights)


def test_generate_runs_on_sdpa_and_training_forward_on_fa2(applied, tmp_path, kernel_calls):
    path = tiny.build_lm(str(tmp_path / "lm"))
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
    (rec,) = panovlm_flashpatch.report(model)
    assert rec["backend"] == "flash_attention_2" and rec["phases"]["generate()"] == "sdpa"
    batch = {k: v.cuda() for k, v in tiny.lm_inputs(batch=2, length=16).items()}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 24 and kernel_calls == [], "generate() should not call flash-attn"
    model(**batch).logits.float().mean().backward()
    assert len(kernel_calls) == model.config.num_hidden_layers


def test_broken_flash_attn_extension_falls_back_to_sdpa_with_the_reason(tmp_path):
    """A shadow flash_attn_2_cuda that fails to import (as an ABI-mismatched build does)."""
    path = tiny.build_lm(str(tmp_path / "lm"))
    shadow = tmp_path / "broken"
    shadow.mkdir()
    (shadow / "flash_attn_2_cuda.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10 (simulated)')\n")
    code = (
        "import sys, json, panovlm_flashpatch\n"
        "panovlm_flashpatch.apply()\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map='cuda')\n"
        "print(json.dumps(panovlm_flashpatch.report(m)))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}", "PANOVLM_FLASHPATCH_AUTO": "0"}
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    (rec,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert rec["backend"] == "sdpa" and len(rec["attempts"]) == 1
    assert "CUDA extension fails to import" in rec["reason"] and "undefined symbol" in rec["reason"]
