"""Padding-free packing for more families (runtime/padding_free.py), against the real VERIFIED_MODEL_TYPES.

The same equivalence as tests/test_padding_free.py (a plain load vs a plugin load with padding_free=True;
loss, logits at real positions and every gradient agree; a spy on the decoder proves the packed path ran)
for Gemma, Gemma2 (attention and final logit soft-capping, a sliding window on alternate layers), Gemma3
text, Phi3 (fused qkv, partial rotary) and Qwen2. A family is tested once it is on the verified list (until
then it is skipped, and says so). Qwen2-VL and Qwen2.5-VL must stay padded: their decoder separates packed
sequences only when given 4-row (text + 3 multimodal RoPE) position_ids, and a packed call gives it one row.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import panovlm_flashpatch
from panovlm_flashpatch import tiny
from panovlm_flashpatch.runtime import padding_free
from test_padding_free import DecoderSpy, assert_same, padded_batch, run

NEW_MASKS = padding_free.sdpa_separates_packed()  # transformers >= 4.53
PACKING = ("gemma", "gemma2", "gemma3_text", "phi3", "qwen2")
REFUSED = ("qwen2_vl", "qwen2_5_vl")
CASES = [("right", True), ("right", False), ("left", True)]
CASE_IDS = ["right-labels", "right-own_loss", "left-labels"]


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory):
    """Builds each family's tiny checkpoint once, on first use."""
    root, built = tmp_path_factory.mktemp("pf_families"), {}

    def get(family):
        if family not in built:
            built[family] = tiny.build_causal_lm(str(root / family), family)
        return built[family]

    return get


class Spy(DecoderSpy):
    """DecoderSpy on ``get_decoder()``: Gemma3ForCausalLM's ``base_model`` is the LM itself on 4.57
    (base_model_prefix "language_model", decoder attribute "model"), which would see the padded call."""

    def __init__(self, model):
        self.batches = []
        model.get_decoder().register_forward_pre_hook(self._hook, with_kwargs=True)


def model_class(family):
    return getattr(transformers, tiny.family_class_name(family))


def needs(family, attn=None, listed=False):
    """Skips where this transformers cannot run the family (on ``attn``), or the family is not yet verified."""
    if not tiny.has_family(family):
        pytest.skip(f"transformers {transformers.__version__} has no {tiny.family_class_name(family)}")
    if attn is not None and not NEW_MASKS:
        pytest.skip("SDPA/eager keep packed sequences apart from 4.53")
    if attn == "sdpa" and getattr(model_class(family), "_supports_sdpa", True) is False:
        pytest.skip(f"transformers {transformers.__version__} has no SDPA for {tiny.family_class_name(family)}")
    if listed and family not in padding_free.VERIFIED_MODEL_TYPES:
        pytest.skip(f"{family!r} is not in padding_free.VERIFIED_MODEL_TYPES yet")


def load_pair(path, family, attn="sdpa", **kwargs):
    """(plain reference, plugin load with padding-free on), through the family's own class."""
    cls = model_class(family)
    panovlm_flashpatch.remove()
    reference = cls.from_pretrained(path, attn_implementation=attn, **kwargs).train()
    assert panovlm_flashpatch.apply(padding_free=True)
    return reference, cls.from_pretrained(path, attn_implementation=attn, **kwargs).train()


@pytest.mark.parametrize("family", PACKING)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side, labels", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("embeds", [False, True], ids=["input_ids", "inputs_embeds"])
def test_family_packed_forward_equals_padded(family_ckpts, family, attn, side, labels, embeds):
    needs(family, attn, listed=True)
    reference, packed = load_pair(family_ckpts(family), family, attn)
    assert panovlm_flashpatch.report(packed)[0]["padding_free"].startswith("padding-free on:")
    spy = Spy(packed)
    batch = padded_batch(side, labels=labels)
    expected, got = run(reference, batch, embeds), run(packed, batch, embeds)
    assert spy.batches == [1], "the forward was not packed"
    assert_same(expected, got, batch)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_the_sliding_window_and_soft_caps_apply_in_the_test_batch(family_ckpts, family):
    """The window (4) is shorter than the rows (up to 10): without it the reference logits change, so a
    packed run that lost the window (or mixed windows across sequences) fails the equivalence test."""
    needs(family)
    path = family_ckpts(family)
    cls = model_class(family)
    batch = padded_batch("right")
    real = batch["attention_mask"].bool()
    layers = getattr(transformers.AutoConfig.from_pretrained(path), "layer_types", None)  # None before 4.53
    if layers is not None:
        assert {"sliding_attention", "full_attention"} <= set(layers)
    variants = {"window": dict(sliding_window=1000)}
    if family == "gemma2":  # eager applies both caps (SDPA drops the attention cap, both arms alike)
        variants.update(attention_cap=dict(attn_logit_softcapping=None), final_cap=dict(final_logit_softcapping=None))
    with torch.no_grad():
        base = cls.from_pretrained(path, attn_implementation="eager")(**batch).logits[real]
        for name, off in variants.items():
            other = cls.from_pretrained(path, attn_implementation="eager", **off)(**batch).logits[real]
            assert (other - base).abs().max() > 1e-3, f"the {name} does not change the test batch's logits"


@pytest.mark.parametrize("family", REFUSED)
def test_multimodal_rope_families_stay_padded_and_say_why(family_ckpts, family):
    needs(family)
    path = family_ckpts(family)
    reference, loaded = load_pair(path, family)
    records = panovlm_flashpatch.report(loaded)
    assert records and all(r["padding_free"].startswith("padding-free off:") for r in records), records
    why = records[0]["padding_free"]
    assert f"model type {family!r} stays padded" in why and "multimodal RoPE" in why, why
    assert not padding_free.is_armed(loaded)
    spy = Spy(loaded)
    batch = padded_batch("right")
    expected, got = run(reference, batch), run(loaded, batch)
    assert spy.batches == [batch["input_ids"].shape[0]], "a refused family's forward must stay padded"
    assert torch.equal(got[1], expected[1])
    if not NEW_MASKS:
        return
    # Why: the call padding-free would make (one row of restarting position_ids) lets the sequences attend
    # to each other here; the 4-row form Qwen2-VL's decoder reads for packing (text row first) does not.
    present = batch["attention_mask"].bool()
    order = torch.argsort((~present).flatten().to(torch.int8), stable=True)[: int(present.sum())]
    positions = (torch.arange(present.shape[1])[None] - present.int().argmax(1)[:, None]).flatten()[order]
    labels = batch["labels"].flatten()[order].masked_fill(positions == 0, -100)[None]
    ids = batch["input_ids"].flatten()[order][None]
    panovlm_flashpatch.remove()
    with torch.no_grad():
        want = reference(**batch).loss
        one_row = reference(input_ids=ids, position_ids=positions[None], labels=labels, use_cache=False).loss
        four_rows = reference(input_ids=ids, position_ids=positions.expand(4, 1, -1), labels=labels, use_cache=False).loss
    assert abs(one_row - want) > 1e-4 * want, "one-row packing no longer mixes sequences: re-check this family"
    assert abs(four_rows - want) <= 1e-5 * want


@pytest.mark.parametrize("rope, packs", [({"rope_type": "dynamic", "factor": 2.0}, False),
                                         ({"rope_type": "linear", "factor": 2.0}, True)])
def test_rope_that_reads_the_longest_position_stays_padded(tmp_path, rope, packs):
    """Dynamic NTK (and Phi-3's longrope) pick frequencies from a forward's longest position, which packing changes."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rope_scaling=rope)
    path = str(tmp_path / "llama")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    assert panovlm_flashpatch.apply(padding_free=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert padding_free.is_armed(model) is packs
    if not packs:
        assert "'dynamic' RoPE picks its frequencies" in panovlm_flashpatch.report(model)[0]["padding_free"]


# --- LLaVA-style composites: packed at the top level, image tokens in order ------------------------------------

IMAGE = 127  # tiny.build_llava's image token
PATCHES = 16  # a 32 px SigLIP tower of 8 px patches, strategy "full"


def llava_batch(side):
    torch.manual_seed(3)
    lengths, width, has_image = (30, 22, 9, 26), 30, (True, True, False, True)
    ids = torch.randint(0, 120, (4, width))
    mask = tiny.padding_mask(lengths, width, side)
    first = mask.argmax(1)
    for row, has in enumerate(has_image):
        if has:
            start = int(first[row]) + 2  # two text tokens, then the image
            ids[row, start:start + PATCHES] = IMAGE
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    labels[torch.arange(4), first] = -100
    pixels = torch.randn(sum(has_image), 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


@pytest.mark.skipif(not padding_free.sdpa_separates_packed(), reason="composites are packed from transformers 4.53")
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_llava_with_a_qwen3_lm_trains_packed_equal_to_padded(tmp_path, attn, side):
    path = tiny.build_llava(str(tmp_path / "llava"), vision="siglip")
    panovlm_flashpatch.remove()
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn).train()
    assert panovlm_flashpatch.apply(padding_free=True)
    packed = transformers.LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn).train()
    records = {r["component"]: r for r in panovlm_flashpatch.report(packed)}
    assert records["text_config"]["padding_free"].startswith("padding-free on")
    assert records["vision_config"]["padding_free"] is None
    seen = []
    packed.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    batch = llava_batch(side)
    results = []
    for model in (reference, packed):
        model.zero_grad(set_to_none=True)
        out = model(**batch, use_cache=False)
        out.loss.backward()
        results.append((out.loss.detach(), out.logits.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert seen == [1], "the language model did not get one packed row"
    (ref_loss, ref_logits, ref_grads), (loss, logits, grads) = results
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    real = batch["attention_mask"].bool()
    assert torch.allclose(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert any("vision" in name for name in grads)
    for name, ref in ref_grads.items():  # a floor: a gradient that is 0 in truth holds float noise in both runs
        assert (grads[name] - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1e-5), name
