"""On a CUDA GPU: ``fast_generate`` decodes on a static cache through transformers' compiled step (issue 15).

Tokens identical to plain transformers' default (dynamic-cache) generate() on the same weights, the compiled
path actually taken (TorchDynamo compiled graphs, transformers' compiled call on the model), a bounded number of
compilations over a loop of varying prompt lengths, and nothing compiled with the switch off. Skipped without a
CUDA GPU; flash-attn is not needed (with it, the model loads on FlashAttention-2 and generate() runs on SDPA).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import panovlm_flashpatch
from panovlm_flashpatch import _safety, tiny
from panovlm_flashpatch.runtime import fast_generate

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if fast_generate.sizing() is None:
    pytest.skip("this transformers does not compile generate()'s decode step", allow_module_level=True)


@pytest.fixture
def fast():
    panovlm_flashpatch.remove()
    _safety.internal_errors.clear()
    assert panovlm_flashpatch.apply(fast_generate=True)
    torch._dynamo.reset()
    yield
    panovlm_flashpatch.remove()
    torch._dynamo.reset()
    assert _safety.internal_errors == []


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny.build_lm(str(tmp_path_factory.mktemp("fastgen") / "lm"))


def _plain(path):
    os.environ["DISABLE_FLASH_ATTN"] = "1"
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    finally:
        del os.environ["DISABLE_FLASH_ATTN"]


def _graphs():
    return fast_generate._graphs()


def _status(model):
    return panovlm_flashpatch.report(model)[0]["fast_generate"]


def test_greedy_tokens_are_identical_and_the_compiled_path_is_taken(fast, lm):
    plain = _plain(lm)
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.bfloat16, device_map="cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (1, 40), generator=g).cuda()
    before = _graphs()
    got = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert _graphs() > before, "no graph was compiled: the static-cache path was not taken"
    assert hasattr(model, "_compiled_call"), "transformers' compiled decode call was not built"
    assert torch.equal(got, plain.generate(ids, max_new_tokens=24, do_sample=False))
    # Left-padded batch and inputs_embeds (PanoLLaVA's generate(inputs_embeds=...)).
    batch = torch.randint(0, 120, (4, 48), generator=g).cuda()
    mask = tiny.padding_mask([48, 40, 31, 20], side="left").cuda()
    assert torch.equal(model.generate(batch, attention_mask=mask, max_new_tokens=16, do_sample=False),
                       plain.generate(batch, attention_mask=mask, max_new_tokens=16, do_sample=False))
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=16, do_sample=False),
                       plain.generate(inputs_embeds=embeds, max_new_tokens=16, do_sample=False))
    torch.manual_seed(3)
    sampled = model.generate(ids, max_new_tokens=16, do_sample=True, top_k=20)
    assert sampled.shape == (1, 56)
    assert "compilation" in _status(model), _status(model)


def test_a_varying_length_loop_compiles_a_bounded_number_of_times(fast, lm):
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.bfloat16, device_map="cuda")
    g = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(20, 200, (12,), generator=g)]
    buckets = {fast_generate.bucket(n + 16 + 1) for n in lengths}
    before = _graphs()
    for n in lengths:
        model.generate(torch.randint(0, 120, (1, n), generator=g).cuda(), max_new_tokens=16, do_sample=False)
    compiled = _graphs() - before
    assert 1 <= compiled <= len(buckets), (compiled, buckets)
    tally = fast_generate.tally_of(model)
    assert tally["fast"] == 12 and tally["compilations"] == compiled


def test_with_the_switch_off_nothing_is_compiled(lm):
    panovlm_flashpatch.remove()
    assert panovlm_flashpatch.apply()
    try:
        model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.bfloat16, device_map="cuda")
        before = _graphs()
        model.generate(torch.randint(0, 120, (1, 30)).cuda(), max_new_tokens=8, do_sample=False)
        assert _graphs() == before and not hasattr(model, "_compiled_call")
        assert _status(model) is None
    finally:
        panovlm_flashpatch.remove()
