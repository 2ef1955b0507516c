"""Per-phase backends on a real GPU (issue 13): the defaults do what the report says, with the kernels named.

* padding-free is on by default for FlashAttention-2 forwards and its packed step equals the padded one;
* a batch-1 training forward of an FA2 language model runs torch's flash kernel through SDPA (not flash-attn, not
  cuDNN) and gives the loss and gradients of the FlashAttention-2 forward;
* with cuDNN's SDPA kernel off for a forward (runtime/sdpa_order.py), SDPA runs torch's flash kernel: the
  profiler names the kernels.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import panovlm_flashpatch
from panovlm_flashpatch import tiny
from panovlm_flashpatch.runtime import padding_free, sdpa_order

from gpu.conftest import skip_without_fa2

pytestmark = pytest.mark.gpu
skip_without_fa2()

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=6, vocab_size=512)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny.build_lm(str(tmp_path_factory.mktemp("phases") / "lm"), **SHAPE)


def load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cuda", dtype=torch.bfloat16,
                                                             **kwargs).train()


def step(model, **call):
    model.zero_grad(set_to_none=True)
    out = model(**call)
    out.loss.backward()
    return out.loss.float().item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def close(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) <= 1e-2 * abs(loss_b)
    for name, ref in grads_b.items():
        assert (grads_a[name] - ref).norm() <= 5e-2 * ref.norm().clamp_min(1e-6), name


def test_default_packs_padded_fa2_training_and_matches_padded(applied, lm, monkeypatch):
    packed = load(lm)
    assert padding_free.is_armed(packed)
    monkeypatch.setenv("PANOVLM_FLASHPATCH_PADDING_FREE", "0")
    padded = load(lm)
    lengths = (300, 41, 128, 7)
    ids = torch.randint(0, 512, (4, 300), device="cuda")
    mask = tiny.padding_mask(lengths, 300, "right").cuda()
    call = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    close(step(packed, **call), step(padded, **call))


def test_batch_1_training_runs_sdpa_flash_first_with_the_fa2_result(applied, lm, kernel_calls):
    model = load(lm)
    assert panovlm_flashpatch.report(model)[0]["phases"].get("batch-1 training") == "sdpa"
    ids = torch.randint(0, 512, (1, 1400), device="cuda")
    names = _kernels(lambda: step(model, input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids))
    assert not kernel_calls, "flash-attn ran a batch-1 training forward"
    assert any("pytorch_flash" in n for n in names) and not any("cudnn" in n.lower() for n in names)
    routed = step(model, input_ids=ids, labels=ids)
    panovlm_flashpatch.apply(sdpa_flash_first=False)
    fa2 = step(load(lm), input_ids=ids, labels=ids)
    assert kernel_calls
    close(routed, fa2)


def _kernels(call) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


def test_without_cudnn_sdpa_runs_torchs_flash_kernel(applied):
    q = torch.randn(2, 16, 1003, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 8, 1003, 128, device="cuda", dtype=torch.bfloat16)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)  # noqa: E731
    default = _kernels(sdpa)
    with sdpa_order._flash_before_cudnn():
        ours = _kernels(sdpa)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    print("torch's order:", [n for n in default if "attention" in n.lower() or "fmha" in n.lower() or "flash" in n.lower()])
    print("flash first:", [n for n in ours if "attention" in n.lower() or "fmha" in n.lower() or "flash" in n.lower()])
    assert any("flash" in n.lower() for n in ours) and not any("cudnn" in n.lower() for n in ours)
