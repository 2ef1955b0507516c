"""``padding_free="loss_only"`` on a real GPU: packed on FlashAttention-2, the loss chunked (runtime/chunked_loss.py).

A real 151,936-token vocabulary, bf16, a padded batch of ~4,000 real tokens (three chunks). The reference is plain
transformers, padded, on FlashAttention-2; tolerances as in test_gpu_padding_free.py. The peak memory of the step
must be lower than the same packed step with the logits (``padding_free=True``) by at least one float32 copy of
the packed row's logits: what the chunks are for.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import panovlm_flashpatch
from panovlm_flashpatch import tiny
from panovlm_flashpatch.runtime import chunked_loss

from gpu.conftest import skip_without_fa2

pytestmark = pytest.mark.gpu
skip_without_fa2()

VOCAB = 151936
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=2, vocab_size=VOCAB)
LENGTHS = (900, 370, 1024, 55, 640, 300, 512, 230)


def batch():
    torch.manual_seed(5)
    width = max(LENGTHS)
    ids = torch.randint(0, VOCAB, (len(LENGTHS), width))
    mask = tiny.padding_mask(LENGTHS, width, "right")
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": ids.masked_fill(mask == 0, -100).cuda()}


def step(model, data):
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = model(**data)
    out.loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return out, out.loss.float().item(), {n: p.grad.float() for n, p in model.named_parameters()}, peak


def test_chunked_loss_equals_the_padded_run_and_holds_less(tmp_path):
    path = tiny.build_lm(str(tmp_path / "lm"), **SHAPE)
    kwargs = dict(device_map="cuda", dtype=torch.bfloat16, attn_implementation="flash_attention_2")
    assert chunked_loss.chunk_rows(VOCAB) < sum(LENGTHS) / 2  # several chunks at the real size
    panovlm_flashpatch.remove()
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).train()
    data = batch()
    want = step(reference, data)
    del reference
    results = {}
    for mode in (True, "loss_only"):
        panovlm_flashpatch.remove()
        assert panovlm_flashpatch.apply(padding_free=mode)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).train()
        results[mode] = step(model, data)
        del model
    panovlm_flashpatch.remove()
    out, loss, grads, peak = results["loss_only"]
    assert out.logits is None
    assert abs(loss - want[1]) <= 1e-2 * abs(want[1]), (loss, want[1])
    for name, ref in want[2].items():
        err = (grads[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 5e-2, (name, err.item())
    fp32_logits = sum(LENGTHS) * VOCAB * 4
    saved = results[True][3] - peak
    assert saved >= fp32_logits, (f"peak {peak / 2**30:.2f} GiB vs {results[True][3] / 2**30:.2f} GiB with the logits "
                                  f"(padded reference {want[3] / 2**30:.2f}); one fp32 copy is {fp32_logits / 2**30:.2f}")
    print(f"peak of one step: padded {want[3] / 2**30:.2f} GiB, packed {results[True][3] / 2**30:.2f}, packed + chunked "
          f"loss {peak / 2**30:.2f}")
