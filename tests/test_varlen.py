"""Padding-free without flash-attn: packed SDPA forwards on torch's varlen kernel (runtime/varlen.py).

A plain padded load against a plugin load whose padded training forwards run packed, their attention on the
varlen kernel (a CPU stand-in with the signature of torch 2.11 or of 2.12+, tests/varlen_stand_in.py): loss,
logits at real positions and every gradient agree, the kernel ran once per layer on one packed row, and no
block-diagonal mask was built. Also: gradient checkpointing (the recompute in the backward), what keeps a forward
off the kernel, and what the report, the by_phase record and the doctor say.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import panovlm_flashpatch
import varlen_stand_in
from conftest import TV, caps
from panovlm_flashpatch import backends, tiny
from panovlm_flashpatch.runtime import padding_free, varlen
from test_padding_free import assert_same, padded_batch, run
from test_padding_free_families import Spy as DecoderSpy  # on get_decoder(): Gemma 3 on 4.57 (see there)

pytestmark = pytest.mark.skipif(not padding_free.passes_varlen_kwargs() or varlen.kernel() is None,
                                reason="transformers >= 4.53 and a torch with torch.nn.attention.varlen")

KERNELS = {"torch2.11": varlen_stand_in.varlen_attn_2_11, "torch2.13": varlen_stand_in.varlen_attn_2_13}
FAMILIES = {  # family -> config overrides (mistral: a window shorter than the rows)
    "qwen3": {}, "llama": {}, "mistral": {"sliding_window": 4}, "gemma": {}, "gemma3_text": {}, "phi3": {},
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("varlen"), {}

    def get(family):
        if family not in built:
            if family == "qwen3":
                built[family] = tiny.build_lm(str(root / family))
            else:
                if not tiny.has_family(family):
                    pytest.skip(f"transformers {transformers.__version__} has no {family}")
                built[family] = tiny.build_causal_lm(str(root / family), family, **FAMILIES[family])
        return built[family]

    return get


@pytest.fixture
def stand_in(monkeypatch):
    def activate(kernel="torch2.13"):
        return varlen_stand_in.activate(monkeypatch, caps, KERNELS[kernel])
    return activate


def load(path, **apply_options):
    """(plain padded reference, plugin load), both float32 on SDPA."""
    panovlm_flashpatch.remove()
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa",
                                                                  dtype=torch.float32).train()
    assert panovlm_flashpatch.apply(**apply_options)
    return reference, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()


def no_block_mask(monkeypatch):
    """Fails the test if SDPA's mask function builds a mask during the packed forward."""
    from transformers import masking_utils

    built = []
    original = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def spy(*args, **kwargs):
        mask = original(*args, **kwargs)
        built.append(mask)
        return mask

    monkeypatch.setitem(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    return built


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_on_the_varlen_kernel_equals_padded(ckpts, stand_in, monkeypatch, kernel, family, side):
    calls = stand_in(kernel)
    reference, model = load(ckpts(family))  # the default: padding-free auto
    record = panovlm_flashpatch.report(model)[0]
    assert record["backend"] == "sdpa"
    assert "torch's varlen flash kernel" in record["padding_free"], record["padding_free"]
    assert record["by_phase"][backends.PADDED]["backend"] == backends.SDPA_VARLEN, record["by_phase"]
    spy = DecoderSpy(model)
    masks = no_block_mask(monkeypatch)
    batch = padded_batch(side)
    expected = run(reference, batch)
    masks.clear()
    got = run(model, batch)
    assert spy.batches == [1], "the forward was not packed"
    layers = model.config.num_hidden_layers
    assert len(calls) == layers and {c[0] for c in calls} == {int(batch["attention_mask"].sum())}, calls
    assert all(m is None for m in masks), "a mask was built for the packed row"
    if family == "mistral":
        assert {c[3] for c in calls} == {(3, 0)}, "the sliding window (4) did not reach the kernel"
    assert_same(expected, got, batch)
    assert model.config._attn_implementation == varlen.KEY  # until remove(), SDPA to everyone else:
    assert panovlm_flashpatch.report(model)[0]["backend"] == "sdpa"
    panovlm_flashpatch.remove()
    assert model.config._attn_implementation == "sdpa"


def test_the_window_changes_the_mistral_reference(ckpts):
    """The window (4) is shorter than the rows (up to 10): a packed run that lost it fails the test above."""
    path = ckpts("mistral")
    batch = padded_batch("right")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")(**batch).logits
        wide = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                                 sliding_window=1000)(**batch).logits
    assert (wide[real] - base[real]).abs().max() > 1e-3


def test_gradient_checkpointing_recomputes_on_the_kernel(ckpts, stand_in):
    """The recompute in the backward runs the layers again after the forward returned: it must see the varlen key
    (no mask, the same boundaries), not SDPA with no mask (one causal row: sequences attending to each other)."""
    calls = stand_in()
    reference, model = load(ckpts("qwen3"))
    for m in (reference, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = padded_batch("right")
    expected, got = run(reference, batch), run(model, batch)
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers, "the recompute did not run on the kernel"
    assert_same(expected, got, batch)


def test_the_key_outside_a_packed_forward_is_sdpa(ckpts, stand_in):
    """A forward that finds the key in place (a direct call of the inner model, after a checkpointed step) runs SDPA
    with its own mask: the padded result, and no kernel call."""
    calls = stand_in()
    reference, model = load(ckpts("qwen3"))
    assert varlen.register()
    model.config.__dict__["_attn_implementation_internal"] = varlen.KEY
    batch = padded_batch("right")
    with torch.no_grad():
        want = reference.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert calls == []
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-6)


def test_float32_outside_autocast_stays_padded_by_default(ckpts, stand_in, monkeypatch):
    """The real kernel takes float16/bfloat16 only: a float32 forward is not packed by default (SDPA padded)."""
    calls = stand_in()
    monkeypatch.setattr(varlen, "HALF", (torch.float16, torch.bfloat16))
    reference, model = load(ckpts("qwen3"))
    spy = DecoderSpy(model)
    batch = padded_batch("right")
    (_, want, _, _), (_, got, _, _) = run(reference, batch), run(model, batch)
    assert torch.equal(got, want)
    assert calls == [] and spy.batches == [batch["input_ids"].shape[0]]


def test_a_float32_model_under_bfloat16_autocast_packs(ckpts, stand_in):
    calls = stand_in()
    _, model = load(ckpts("qwen3"))
    spy = DecoderSpy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**padded_batch("right")).loss.backward()
    assert spy.batches == [1] and calls


def test_no_gpu_no_varlen_and_the_report_says_why(ckpts):
    """This machine as it is: no GPU. The default packs nothing, and by_phase names the reason."""
    _, model = load(ckpts("qwen3"))
    assert not padding_free.is_armed(model)
    rejected = panovlm_flashpatch.report(model)[0]["by_phase"][backends.PADDED]["rejected"]
    assert "needs a CUDA GPU" in rejected[backends.SDPA_VARLEN], rejected


def test_keep_explicit_sdpa_keeps_sdpas_kernels(ckpts, stand_in):
    calls = stand_in()
    panovlm_flashpatch.remove()
    assert panovlm_flashpatch.apply(keep_explicit_sdpa=True, padding_free=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpts("qwen3"), attn_implementation="sdpa",
                                                              dtype=torch.float32).train()
    record = panovlm_flashpatch.report(model)[0]
    assert "keep_explicit_sdpa" in record["by_phase"][backends.PADDED]["rejected"][backends.SDPA_VARLEN]
    spy = DecoderSpy(model)
    model(**padded_batch("right")).loss.backward()
    assert spy.batches == [1] and calls == [], "padding_free=True packs with SDPA's block mask, not the kernel"


def test_a_layer_the_kernel_cannot_compute_runs_exactly_per_sequence(ckpts, stand_in, monkeypatch):
    """An older signature without a window: the sliding-window layers are computed per sequence with torch ops."""
    def no_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        raise AssertionError("a call this signature cannot express reached the kernel")

    stand_in()
    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", no_window)
    reference, model = load(ckpts("mistral"))
    batch = padded_batch("right")
    assert_same(run(reference, batch), run(model, batch), batch)


def test_the_doctor_lists_the_varlen_rung(stand_in):
    stand_in()
    from panovlm_flashpatch import doctor

    info = doctor.collect() if hasattr(doctor, "collect") else doctor.gather()
    assert info["backend.sdpa_varlen"].startswith("usable"), info["backend.sdpa_varlen"]


@pytest.mark.skipif(not padding_free.sdpa_separates_packed(), reason="composites are packed from transformers 4.53")
def test_a_llava_packs_on_the_varlen_kernel(tmp_path, stand_in):
    from test_padding_free_families import llava_batch

    calls = stand_in()
    path = tiny.build_llava(str(tmp_path / "llava"), vision="siglip")
    panovlm_flashpatch.remove()
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).train()
    assert panovlm_flashpatch.apply()
    packed = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).train()
    records = {r["component"]: r for r in panovlm_flashpatch.report(packed)}
    assert "torch's varlen flash kernel" in records["text_config"]["padding_free"], records["text_config"]
    batch = llava_batch("right")
    results = []
    for model in (reference, packed):
        out = model(**batch, use_cache=False)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert calls and {c[0] for c in calls} == {int(batch["attention_mask"].sum())}
    (ref_loss, ref_grads), (loss, grads) = results
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1e-5), name


def test_a_kernel_that_refuses_the_call_costs_no_step(ckpts, stand_in, monkeypatch, caplog):
    """A wrapper around torch's kernel that hides its signature (a profiler's, say): the plugin's guess of the
    arguments is refused with a TypeError before any launch; the layer is computed per sequence, and a warning says so."""
    import logging

    stand_in()
    real = varlen_stand_in.varlen_attn_2_11

    def refuses(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        raise TypeError("varlen_attn() got an unexpected keyword argument 'window_size'")

    batch = padded_batch("right")
    for kernel, message in ((lambda *args, **kwargs: real(*args, **kwargs), "cannot be told whether the attention"),
                            (refuses, "refused the packed call")):
        monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", kernel)
        reference, model = load(ckpts("qwen3"))
        with caplog.at_level(logging.WARNING, logger="panovlm_flashpatch"):
            assert_same(run(reference, batch), run(model, batch), batch)
        assert message in caplog.text


# --- a layer computes what its own arguments ask, whatever else runs (adversarial review) --------------------------

def _steps(models, batch, between=None):
    """A training step per model: forward, ``between(model)`` (another forward before the backward), backward."""
    out = []
    for m in models:
        m.zero_grad(set_to_none=True)
        loss = m(**batch).loss
        if between is not None:
            between(m)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    return out


def _assert_same_grads(results):
    (ref_loss, ref_grads), (loss, grads) = results
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1e-12), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_another_forward_between_a_checkpointed_forward_and_its_backward(ckpts, stand_in, reentrant):
    """TRL's DPO (reference log-probs), a teacher or a metrics pass: a forward of the same model before the backward,
    whose recompute must still run the packed layers on the kernel."""
    calls = stand_in()
    reference, model = load(ckpts("qwen3"))
    for m in (reference, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    other = torch.randint(0, 120, (2, 7))

    def between(m):
        with torch.no_grad():
            m(input_ids=other)

    _assert_same_grads(_steps((reference, model), padded_batch("right"), between))
    assert len(calls) == 2 * model.config.num_hidden_layers


@pytest.mark.parametrize("kind", ["composable", "own"])
def test_checkpointing_the_plugin_cannot_see(ckpts, stand_in, kind):
    """torch's composable checkpoint() (FSDP2 style), or a user's own torch.utils.checkpoint around each layer."""
    import torch.utils.checkpoint as tuc

    stand_in()
    reference, model = load(ckpts("qwen3"))
    for m in (reference, model):
        for layer in m.model.layers:
            if kind == "composable":
                from torch.distributed._composable import checkpoint

                checkpoint(layer)
            else:
                layer.forward = (lambda *a, _f=layer.forward, **k: tuc.checkpoint(_f, *a, use_reentrant=False, **k))
    # use_cache=False: transformers turns the cache off under its own checkpointing only; a recompute would append
    # to it again
    _assert_same_grads(_steps((reference, model), {**padded_batch("right"), "use_cache": False}))


def test_a_forward_in_another_thread_during_a_packed_one(ckpts, stand_in, monkeypatch):
    """DataParallel replicas share one config, and an evaluation thread may run beside training: a forward in
    another thread, while this thread's packed forward is inside its first layer, changes nothing for either."""
    import functools
    import threading

    calls = stand_in()
    reference, model = load(ckpts("qwen3"))
    inner, fired = torch.nn.attention.varlen.varlen_attn, []
    other_ids = torch.randint(0, 120, (1, 5))
    seen = {}

    @functools.wraps(inner)
    def kernel(*args, **kwargs):
        if not fired:
            fired.append(True)

            def other():
                with torch.no_grad():
                    seen["logits"] = model(input_ids=other_ids).logits

            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
        return inner(*args, **kwargs)

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", kernel)
    _assert_same_grads(_steps((reference, model), padded_batch("right")))
    assert fired and len(calls) == model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.allclose(seen["logits"], reference(input_ids=other_ids).logits, atol=1e-5)


def test_a_copy_or_pickle_of_the_config_carries_sdpa(ckpts, stand_in):
    import copy
    import pickle

    stand_in()
    _, model = load(ckpts("qwen3"))
    model(**padded_batch("right")).loss.backward()
    assert model.config._attn_implementation == varlen.KEY
    assert pickle.loads(pickle.dumps(model.config))._attn_implementation == "sdpa"
    twin = copy.deepcopy(model)  # a DPO reference model, say: its own packed forwards put it on the key again
    assert twin.config._attn_implementation == "sdpa"


def test_a_decoder_with_its_own_mask_code_is_not_put_on_the_kernel(ckpts, stand_in, monkeypatch):
    """A decoder that builds its mask with its own code (transformers 4.53-4.56 families still on
    _update_causal_mask) would build one causal mask over the packed row and hand it to SDPA: refused, with why."""
    calls = stand_in()
    monkeypatch.setattr(padding_free, "_module_builds_packed_masks", lambda model: False)
    _, model = load(ckpts("qwen3"))
    rejected = panovlm_flashpatch.report(model)[0]["by_phase"][backends.PADDED]["rejected"]
    assert "does not build its mask with create_causal_mask" in rejected[backends.SDPA_VARLEN], rejected
    model(**padded_batch("right")).loss.backward()
    assert calls == []


# --- second adversarial run ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["composable", "own"])
def test_checkpointing_around_the_whole_decoder(ckpts, stand_in, kind):
    """The recompute runs the whole decoder again in the backward, outside the packed forward: it rebuilds SDPA's
    mask, and the layers must still run what the forward ran (else torch's CheckpointError, or other gradients)."""
    import torch.utils.checkpoint as tuc

    calls = stand_in()
    reference, model = load(ckpts("qwen3"))
    for m in (reference, model):
        if kind == "composable":
            from torch.distributed._composable import checkpoint

            checkpoint(m.model)
        else:
            m.model.forward = (lambda *a, _f=m.model.forward, **k: tuc.checkpoint(_f, *a, use_reentrant=False, **k))
    _assert_same_grads(_steps((reference, model), {**padded_batch("right"), "use_cache": False}))
    assert len(calls) == 2 * model.config.num_hidden_layers


@pytest.mark.skipif(TV < (5, 0), reason="transformers reads config.is_causal from 5.0")
def test_a_decoder_made_bidirectional_stays_padded(ckpts, stand_in):
    """transformers 5 runs a decoder bidirectionally with config.is_causal=False; packing keeps sequences apart with
    causal masks only, so such a model stays padded (same logits as plain transformers)."""
    calls = stand_in()
    reference, model = load(ckpts("qwen3"))
    for m in (reference, model):
        m.config.is_causal = False
    batch = padded_batch("right")
    (_, want, _, _), (_, got, _, _) = run(reference, batch), run(model, batch)
    assert torch.equal(got, want) and calls == []


def test_a_batch_of_padding_only_runs_as_plain_transformers(ckpts, stand_in):
    stand_in()
    reference, model = load(ckpts("qwen3"))
    batch = padded_batch("right", lengths=(0, 0), width=6)
    want, got = reference(**batch).loss, model(**batch).loss
    assert torch.isnan(want) and torch.isnan(got)


def _generate_batch(model):
    """transformers' continuous batching on two prompts, greedy: {request id: generated tokens}."""
    config = transformers.GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.eval().generate_batch([[1, 2, 3], [4, 5, 6, 7]], generation_config=config)
    model.train()
    return {key: list(value.generated_tokens) for key, value in out.items()}


@pytest.mark.skipif(not hasattr(transformers.GenerationMixin, "generate_batch"),
                    reason="transformers without continuous batching")
def test_continuous_batching_after_a_packed_step(ckpts, stand_in):
    """A model that trained packed carries the plugin's key; transformers' continuous batching accepts only names it
    knows ("Implementation panovlm_varlen is not supported for continuous batching"). It gets the model back on
    "sdpa" and generates what plain transformers generates; the next packed step goes on the key again."""
    calls = stand_in()
    reference, model = load(ckpts("qwen3"))
    batch = padded_batch("right")
    run(reference, batch), run(model, batch)
    assert model.config._attn_implementation == varlen.KEY and calls
    want = _generate_batch(reference)
    if not want:  # transformers 4.5x's continuous batching dies on a CPU for plain transformers too
        pytest.skip(f"continuous batching of transformers {transformers.__version__} generates nothing on a CPU")
    assert _generate_batch(model) == want
    assert model.config._attn_implementation == "sdpa"
    calls.clear()
    assert_same(run(reference, batch), run(model, batch), batch)
    assert len(calls) == model.config.num_hidden_layers and model.config._attn_implementation == varlen.KEY
    panovlm_flashpatch.remove()
    assert _generate_batch(model) == want  # the wrapper is gone with the rest, the model back on "sdpa"


@pytest.mark.skipif(not hasattr(transformers.GenerationMixin, "generate_batch"),
                    reason="transformers without continuous batching")
def test_continuous_batching_inside_a_packed_step_keeps_the_key(ckpts, stand_in, caplog):
    """Between a checkpointed packed forward and its backward (or while a packed forward runs in another thread) the
    recompute still needs the key: the model keeps it, continuous batching refuses it loudly, and the gradients stay
    plain transformers' (releasing it there made the reentrant recompute attend across sequences, silently)."""
    import logging
    import threading

    stand_in()
    reference, model = load(ckpts("qwen3"))
    for m in (reference, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    batch = padded_batch("right")
    seen = []

    def look_from_another_thread(*_):
        if not seen:
            other = threading.Thread(target=lambda: seen.append(varlen.busy(model)))
            other.start()
            other.join()

    hook = model.model.layers[1].register_forward_pre_hook(look_from_another_thread)
    expected = run(reference, batch)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    hook.remove()
    assert seen == [True], "a packed forward running in one thread is not seen as busy from another"
    with caplog.at_level(logging.WARNING, logger="panovlm_flashpatch"):
        if transformers.__version__ >= "5":
            with pytest.raises(ValueError, match="not supported for continuous batching"):
                _generate_batch(model)
            assert "inside a packed training step" in caplog.text and "PADDING_FREE=0" in caplog.text
    assert model.config._attn_implementation == varlen.KEY
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected[3].keys()
    for name, grad in expected[3].items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name
    assert not varlen.busy(model)  # the backward has ended: continuous batching may take it now
    want = _generate_batch(reference)
    if want:
        assert _generate_batch(model) == want


@pytest.mark.skipif(not hasattr(transformers.GenerationMixin, "generate_batch") or transformers.__version__ < "5",
                    reason="transformers 5's continuous batching (it checks the name in its manager)")
def test_a_subclass_building_its_own_manager_gets_sdpa_too(ckpts, stand_in, tmp_path):
    from transformers.generation.continuous_batching import continuous_api

    stand_in()
    reference, model = load(ckpts("qwen3"))
    run(model, padded_batch("right"))
    assert model.config._attn_implementation == varlen.KEY
    manager = continuous_api.ContinuousBatchingManager.__new__(continuous_api.ContinuousBatchingManager)
    manager._original_attn_impl = None
    manager.switch_to_cb_friendly_attn(model, False)  # what a subclass's own init_continuous_batching reaches
    assert model.config._attn_implementation == "sdpa"
