"""Padding-free composed with liger-kernel's Qwen3 patches, on a real GPU (liger's Triton kernels need one).

liger patches transformers' Qwen3 module classes for the whole process (RMSNorm, RoPE, SwiGLU, fused linear
cross-entropy), so the reference carries them too: the plain padded run with liger against the plugin's packed run
with liger; loss and every gradient in bf16 tolerance (test_gpu_padding_free.py), and the report names liger's
kernels. Run in its own pytest process (liger's patches cannot be undone): ``python -m pytest -m gpu
tests/gpu/test_gpu_liger.py``.
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
liger = pytest.importorskip("liger_kernel.transformers")

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=4, vocab_size=512)
LENGTHS = (200, 37, 128, 5, 256, 90)


def test_packing_with_liger_equals_the_padded_run_with_liger(tmp_path):
    path = tiny.build_lm(str(tmp_path / "lm"), **SHAPE)
    liger.apply_liger_kernel_to_qwen3()
    kwargs = dict(device_map="cuda", dtype=torch.bfloat16)
    panovlm_flashpatch.remove()
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="flash_attention_2",
                                                                  **kwargs).train()
    assert panovlm_flashpatch.apply()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).train()
    assert padding_free.is_armed(model)
    fused = panovlm_flashpatch.report(model)[0].get("fused_kernels") or ""
    assert "liger_kernel" in fused and "RMSNorm" in fused, fused
    torch.manual_seed(5)
    width = max(LENGTHS)
    ids = torch.randint(0, 512, (len(LENGTHS), width))
    mask = tiny.padding_mask(LENGTHS, width, "right")
    data = {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": ids.masked_fill(mask == 0, -100).cuda()}
    seen = []
    model.get_decoder().register_forward_pre_hook(
        lambda module, args, kw: seen.append((kw.get("input_ids") if kw.get("input_ids") is not None
                                              else args[0]).shape[0]), with_kwargs=True)
    results = []
    for m in (reference, model):
        m.zero_grad(set_to_none=True)
        out = m(**data)
        out.loss.backward()
        results.append((out.loss.float().item(), {n: p.grad.float() for n, p in m.named_parameters()}))
    panovlm_flashpatch.remove()
    assert seen == [1], "the liger forward was not packed"
    (ref_loss, ref_grads), (loss, grads) = results
    assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss), (loss, ref_loss)
    floor = 1e-3 * max(g.norm().item() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        err = (grads[name] - ref).norm().item()
        assert err <= 5e-2 * max(ref.norm().item(), floor), (name, err, ref.norm().item())
