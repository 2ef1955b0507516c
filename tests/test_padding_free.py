"""Padding-free training (runtime/padding_free.py): a packed forward must be indistinguishable from the padded one.

Each test loads the same tiny checkpoint twice through the real ``from_pretrained``: once plain
(the reference, loaded before the patch is applied) and once through the plugin with padding-free
on. Both run the same padded batch in training mode; loss, every parameter gradient, and the
outputs at real-token positions must agree (fp32: loss within 1e-5 relative, gradients within 1e-4
of each tensor's scale). A spy on the decoder proves which path ran: batch 1 (packed) or B (padded),
so a test cannot pass by both arms taking the padded path.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers

import panovlm_flashpatch
from panovlm_flashpatch import tiny
from panovlm_flashpatch.runtime import padding_free
from panovlm_flashpatch import settings as settings_module


NEW_MASKS = padding_free.sdpa_separates_packed()  # transformers >= 4.53
needs_packed_masks = pytest.mark.skipif(not NEW_MASKS, reason="SDPA/eager keep packed sequences apart from 4.53")
LENGTHS = (10, 6, 3, 8)  # real tokens per row; the longest fills the row
WIDTH = 10


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("pf")
    paths = {"qwen": tiny.build_lm(str(root / "qwen"))}
    for family in ("qwen2", "llama", "mistral", "gpt2"):
        paths[family] = tiny.build_causal_lm(str(root / family), family)
    return paths


def load_pair(path, attn="sdpa", **kwargs):
    """(plain reference, model loaded through the plugin with padding-free on), same weights."""
    panovlm_flashpatch.remove()
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kwargs)
    assert panovlm_flashpatch.apply(padding_free=True)
    packed = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kwargs)
    reference.train()
    packed.train()
    return reference, packed


class DecoderSpy:
    """Records the batch size each decoder call saw (1 = packed)."""

    def __init__(self, model):
        self.batches = []
        model.base_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        self.batches.append(tokens.shape[0])


def padded_batch(side="right", lengths=LENGTHS, width=WIDTH, labels=True, first_label_ignored=True):
    torch.manual_seed(3)
    ids = torch.randint(0, 120, (len(lengths), width))
    mask = tiny.padding_mask(lengths, width, side)
    ids = ids.masked_fill(mask == 0, 0)  # pad token 0, as a tokenizer would write it
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels:
        lab = ids.masked_fill(mask == 0, -100)
        if side == "left" and first_label_ignored:
            lab[torch.arange(len(lengths)), mask.argmax(1)] = -100  # e.g. a prompt or image token
        batch["labels"] = lab
    return batch


def own_loss(logits, batch):
    """A caller computing next-token loss from the logits and the attention mask (no labels)."""
    keep = batch["attention_mask"][:, 1:].bool()
    return F.cross_entropy(logits[:, :-1][keep].float(), batch["input_ids"][:, 1:][keep])


def run(model, batch, embeds=False, return_dict=None, **extra):
    model.zero_grad(set_to_none=True)
    call = dict(batch)
    if embeds:
        call["inputs_embeds"] = model.get_input_embeddings()(call.pop("input_ids"))
    if return_dict is not None:
        call["return_dict"] = return_dict
    out = model(**call, **extra)
    if isinstance(out, tuple):
        has_loss = "labels" in batch
        loss, logits = (out[0], out[1]) if has_loss else (None, out[0])
    else:
        loss, logits = out.loss, out.logits
    if loss is None:
        loss = own_loss(logits, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), logits.detach(), grads


def assert_same(reference_run, packed_run, batch):
    ref_out, ref_loss, ref_logits, ref_grads = reference_run
    out, loss, logits, grads = packed_run
    assert type(out) is type(ref_out)
    assert logits.shape == ref_logits.shape
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    real = batch["attention_mask"].bool()
    assert torch.allclose(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    assert not logits[~real].any(), "padding positions of a packed output hold zeros"
    assert grads.keys() == ref_grads.keys() and grads
    for name, ref in ref_grads.items():
        scale = ref.abs().max().clamp_min(1e-12)
        assert (grads[name] - ref).abs().max() <= 1e-4 * scale, name


@needs_packed_masks
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
# Left padding without labels takes the padded path (test_what_packing_cannot_reproduce_...).
@pytest.mark.parametrize("side, labels", [("right", True), ("right", False), ("left", True)],
                         ids=["right-labels", "right-own_loss", "left-labels"])
@pytest.mark.parametrize("embeds", [False, True], ids=["input_ids", "inputs_embeds"])
@pytest.mark.parametrize("return_dict", [True, False], ids=["dict", "tuple"])
def test_packed_forward_equals_padded(lms, attn, side, labels, embeds, return_dict):
    reference, packed = load_pair(lms["qwen"], attn)
    spy = DecoderSpy(packed)
    batch = padded_batch(side, labels=labels)
    # use_cache=False, as training code sets: the padded tuple then carries no cache either.
    extra = {} if return_dict else {"use_cache": False}
    expected = run(reference, batch, embeds, return_dict, **extra)
    got = run(packed, batch, embeds, return_dict, **extra)
    assert spy.batches == [1], "the forward was not packed"
    assert_same(expected, got, batch)
    if not return_dict:
        assert len(got[0]) == len(expected[0])


@needs_packed_masks
@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
def test_other_verified_families(lms, family):
    reference, packed = load_pair(lms[family])
    spy = DecoderSpy(packed)
    batch = padded_batch("right")
    expected, got = run(reference, batch), run(packed, batch)
    assert spy.batches == [1]
    assert_same(expected, got, batch)


@needs_packed_masks
def test_hidden_states_and_attentions_are_unpacked(lms):
    reference, packed = load_pair(lms["qwen"], "eager")
    batch = padded_batch("right")
    want = reference(**batch, output_hidden_states=True, output_attentions=True)
    got = packed(**batch, output_hidden_states=True, output_attentions=True)
    real = batch["attention_mask"].bool()
    assert len(got.hidden_states) == len(want.hidden_states)
    for h, ref in zip(got.hidden_states, want.hidden_states):
        assert h.shape == ref.shape
        assert torch.allclose(h[real], ref[real], atol=1e-5)
    pair = real[:, :, None] & real[:, None, :]  # (B, L, L): real query, real key
    for a, ref in zip(got.attentions, want.attentions):
        assert a.shape == ref.shape
        assert torch.allclose(a.permute(0, 2, 3, 1)[pair], ref.permute(0, 2, 3, 1)[pair], atol=1e-6)


@needs_packed_masks
def test_gradient_checkpointing_and_num_items_in_batch(lms):
    reference, packed = load_pair(lms["qwen"])
    for model in (reference, packed):
        # activation_checkpointing_enable is the 5.x name; gradient_checkpointing_enable is deprecated there.
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    spy = DecoderSpy(packed)
    batch = padded_batch("right")
    expected = run(reference, batch, num_items_in_batch=torch.tensor(40))
    got = run(packed, batch, num_items_in_batch=torch.tensor(40))
    assert spy.batches == [1]
    assert_same(expected, got, batch)


@needs_packed_masks
def test_training_steps_follow_the_padded_curve(lms):
    """Twenty AdamW steps on changing padded batches: the two loss curves stay together."""
    reference, packed = load_pair(lms["qwen"])
    curves = []
    for model in (reference, packed):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(7)
        losses = []
        for _ in range(20):
            lengths = torch.randint(2, WIDTH + 1, (4,), generator=generator).tolist()
            batch = padded_batch("right", lengths=lengths)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert torch.allclose(curves[1], curves[0], rtol=1e-4), (curves[0], curves[1])


def _skipped(caplog, fragment):
    return any("padded) path" in r.getMessage() and fragment in r.getMessage() for r in caplog.records)


@needs_packed_masks
@pytest.mark.parametrize(
    "case, fragment",
    [
        ("left_without_labels", "left padding without labels"),
        ("left_first_label_counted", "predicts it from a pad position"),
        ("pad_labels_counted", "labels at padding positions are not -100"),
        ("hole", "padding between real tokens"),
        ("use_cache", "use_cache=True"),
        ("mask_4d", "not a 2D (batch, length) padding mask"),
        ("wrong_positions", "position_ids do not count"),
    ],
)
def test_what_packing_cannot_reproduce_takes_the_padded_path(lms, caplog, case, fragment):
    reference, packed = load_pair(lms["qwen"])
    spy = DecoderSpy(packed)
    extra = {}
    if case == "left_without_labels":
        batch = padded_batch("left", labels=False)
    elif case == "left_first_label_counted":
        batch = padded_batch("left", first_label_ignored=False)
    elif case == "pad_labels_counted":
        batch = padded_batch("right")
        batch["labels"] = batch["input_ids"].clone()
    elif case == "hole":
        batch = padded_batch("right")
        batch["attention_mask"][0, 4] = 0
        batch["labels"][0, 4] = -100
    elif case == "use_cache":
        batch, extra = padded_batch("right"), {"use_cache": True}
    elif case == "mask_4d":
        batch = padded_batch("right")
        m = batch["attention_mask"].bool()
        causal = torch.ones(WIDTH, WIDTH, dtype=torch.bool).tril()
        allowed = causal[None] & m[:, None, :]
        batch["attention_mask"] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    else:
        batch = padded_batch("right")
        extra = {"position_ids": torch.arange(WIDTH).expand(len(LENGTHS), WIDTH) + 1}
    with caplog.at_level(logging.INFO, logger="panovlm_flashpatch"):
        expected = run(reference, batch, **extra)
        got = run(packed, batch, **extra)
    assert spy.batches == [len(LENGTHS)], "this call must not be packed"
    assert _skipped(caplog, fragment), [r.getMessage() for r in caplog.records]
    assert torch.equal(got[1], expected[1])


@needs_packed_masks
def test_no_padding_eval_mode_and_given_positions(lms, caplog):
    _, packed = load_pair(lms["qwen"])
    spy = DecoderSpy(packed)
    full = padded_batch("right", lengths=(WIDTH,) * 4)
    with caplog.at_level(logging.INFO, logger="panovlm_flashpatch"):
        packed(**full)  # nothing to remove: padded path, silently
        packed.eval()
        with torch.no_grad():
            packed(**padded_batch("right"))  # evaluation: padded path, silently
    assert spy.batches == [4, 4]
    assert not any("padded) path" in r.getMessage() for r in caplog.records)
    packed.train()
    batch = padded_batch("right")
    restarting = torch.arange(WIDTH).expand(len(LENGTHS), WIDTH)  # what a collator writes for right padding
    packed(**batch, position_ids=restarting)
    assert spy.batches[-1] == 1


def test_unverified_model_type_is_left_padded(lms):
    _, packed = load_pair(lms["gpt2"])
    record = panovlm_flashpatch.report(packed)[0]
    assert record["padding_free"].startswith("padding-free off: model type 'gpt2' is not verified")
    assert not padding_free.is_armed(packed)


@pytest.mark.skipif(NEW_MASKS, reason="transformers < 4.53 only")
def test_old_transformers_keep_sdpa_padded_and_say_why(lms, caplog):
    reference, packed = load_pair(lms["qwen"])
    record = panovlm_flashpatch.report(packed)[0]
    assert record["padding_free"].startswith("padding-free armed, inactive: on sdpa padded training forwards stay padded")
    assert "only from 4.53" in record["padding_free"]
    spy = DecoderSpy(packed)
    batch = padded_batch("right")
    with caplog.at_level(logging.INFO, logger="panovlm_flashpatch"):
        got, expected = run(packed, batch), run(reference, batch)
        run(packed, batch)
    assert spy.batches == [len(LENGTHS)] * 2
    assert torch.equal(got[1], expected[1])
    said = [r.getMessage() for r in caplog.records if "padded) path" in r.getMessage()]
    assert len(said) == 1, said  # once, not per step


def test_off_by_default_and_the_variable_turns_it_on(lms, monkeypatch, caplog):
    assert panovlm_flashpatch.apply()
    model = transformers.AutoModelForCausalLM.from_pretrained(lms["qwen"])
    assert panovlm_flashpatch.report(model)[0]["padding_free"] is None
    assert not padding_free.is_armed(model)
    monkeypatch.setenv(settings_module.PADDING_FREE, "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(lms["qwen"])
    assert padding_free.is_armed(model)
    monkeypatch.setenv(settings_module.PADDING_FREE, "maybe")
    with caplog.at_level(logging.WARNING, logger="panovlm_flashpatch"):
        model = transformers.AutoModelForCausalLM.from_pretrained(lms["qwen"])
    assert not padding_free.is_armed(model)
    assert any("PANOVLM_FLASHPATCH_PADDING_FREE='maybe' is not understood" in r.getMessage() for r in caplog.records)
    # apply()'s argument wins over the variable.
    assert panovlm_flashpatch.apply(padding_free=False)
    monkeypatch.setenv(settings_module.PADDING_FREE, "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(lms["qwen"])
    assert not padding_free.is_armed(model)


def test_remove_restores_the_forward(lms):
    cls = transformers.AutoModelForCausalLM.from_config(tiny.lm_config()).__class__
    original = cls.__dict__["forward"]
    _, packed = load_pair(lms["qwen"])
    assert cls.__dict__["forward"] is not original
    panovlm_flashpatch.remove()
    assert cls.__dict__["forward"] is original
    assert not padding_free.is_armed(packed)


@needs_packed_masks
def test_loss_only_leaves_logits_out_of_outputs_with_a_loss(lms, monkeypatch):
    reference, _ = load_pair(lms["qwen"])
    panovlm_flashpatch.remove()  # forgets load_pair's apply(padding_free=True): the variable decides again
    monkeypatch.setenv(settings_module.PADDING_FREE, "loss-only")
    assert panovlm_flashpatch.apply()
    packed = transformers.AutoModelForCausalLM.from_pretrained(lms["qwen"], attn_implementation="sdpa").train()
    assert "carry no logits (loss_only)" in panovlm_flashpatch.report(packed)[0]["padding_free"]
    batch = padded_batch("right")
    out = packed(**batch)
    assert out.logits is None
    assert abs(out.loss.item() - reference(**batch).loss.item()) <= 1e-5 * abs(out.loss.item())
    without_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert packed(**without_labels).logits.shape == (len(LENGTHS), WIDTH, 128)  # no loss: logits kept
    with pytest.raises(ValueError, match="loss_only"):
        panovlm_flashpatch.apply(padding_free="loss")


@needs_packed_masks
def test_a_batch_packed_by_the_caller_passes_through_silently(lms, caplog):
    _, packed = load_pair(lms["qwen"])
    spy = DecoderSpy(packed)
    ids = torch.randint(0, 120, (1, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    with caplog.at_level(logging.INFO, logger="panovlm_flashpatch"):
        packed(input_ids=ids, position_ids=positions, labels=ids)
    assert spy.batches == [1]
    assert not any("padded) path" in r.getMessage() for r in caplog.records)


@needs_packed_masks
def test_fault_a_packing_bug_runs_the_step_padded(lms, monkeypatch, caplog):
    from panovlm_flashpatch import _safety

    reference, packed = load_pair(lms["qwen"])

    def broken(*args, **kwargs):
        raise IndexError("a bug of ours")

    monkeypatch.setattr(padding_free, "_pack", broken)
    batch = padded_batch("right")
    with caplog.at_level(logging.WARNING, logger="panovlm_flashpatch"):
        got, expected = run(packed, batch), run(reference, batch)
    assert torch.equal(got[2], expected[2])
    assert "a forward of Qwen" in caplog.text and "ran padded" in caplog.text and "a bug of ours" in caplog.text
    assert _safety.internal_errors == ["padding-free: IndexError: a bug of ours"]
    _safety.internal_errors.clear()  # expected here; every other test asserts there are none


@needs_packed_masks
def test_a_users_subclass_of_a_verified_lm_is_packed(lms):
    base = type(transformers.AutoModelForCausalLM.from_config(tiny.lm_config()))
    subclass = type("PanoLanguageModel", (base,), {})  # e.g. a project's own LM class
    reference = base.from_pretrained(lms["qwen"], attn_implementation="sdpa").train()
    assert panovlm_flashpatch.apply(padding_free=True)
    packed = subclass.from_pretrained(lms["qwen"], attn_implementation="sdpa").train()
    assert padding_free.is_armed(packed)
    spy = DecoderSpy(packed)
    batch = padded_batch("right")
    expected, got = run(reference, batch), run(packed, batch)
    assert spy.batches == [1]
    assert_same(expected, got, batch)
