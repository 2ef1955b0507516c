"""fast_generate (issue 15): generate() on a static cache with transformers' compiled decode step, opt-in.

The GPU is the one thing faked: ``fast_generate.DEVICES`` gains "cpu" (the ``fast`` fixture), so the plugin takes
its fast path here; transformers then runs the static cache without compiling, unless a test hands it a
``compile_config`` that compiles on every device (the compile tests: real TorchDynamo/Inductor on the CPU).
Everything else is real: tiny checkpoints through from_pretrained, transformers' generate(), its caches.
Tokens are compared with plain transformers' default (dynamic-cache) generate() on the same weights.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

import panovlm_flashpatch
from panovlm_flashpatch import tiny
from panovlm_flashpatch.runtime import fast_generate

from conftest import TV

needs_compiled_decoding = pytest.mark.skipif(fast_generate.sizing() is None,
                                             reason="transformers < 4.48: no compiled decode step")
CACHE_KW = "cache" if TV >= (5, 24) else "past_key_values"  # the name the model's forward gets its cache under


@pytest.fixture
def fast(monkeypatch, patched):
    if fast_generate.sizing() is None:
        pytest.skip("transformers < 4.48: no compiled decode step")
    monkeypatch.setattr(fast_generate, "DEVICES", ("cuda", "cpu"))
    assert panovlm_flashpatch.apply(fast_generate=True)


@pytest.fixture(scope="module")
def reference(ckpts):
    """Plain transformers on the same checkpoint (loaded with the plugin off)."""
    panovlm_flashpatch.remove()
    return AutoModelForCausalLM.from_pretrained(ckpts["lm"])


def ids(batch=1, length=12, seed=0):
    return torch.randint(0, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def caches_seen(model, monkeypatch) -> list:
    """The caches the decoder's forward receives (a spy on the inner model's class)."""
    seen = []
    decoder = model.get_decoder()
    inner = type(decoder)
    original = inner.forward

    def spy(self, *args, **kwargs):
        if self is decoder:  # not the reference model's calls
            seen.append(kwargs.get(CACHE_KW, kwargs.get("past_key_values")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(inner, "forward", spy)
    return seen


def compile_everywhere():
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(mode="default", fullgraph=False)
    config._compile_all_devices = True  # transformers compiles on GPUs only, unless told so
    return config


def tally(model) -> dict:
    return fast_generate.tally_of(model)


def status(model) -> str | None:
    return panovlm_flashpatch.report(model)[0]["fast_generate"]


# --- the fast path gives what plain transformers gives ------------------------------------------------------


def test_greedy_tokens_equal_plain_transformers_and_the_cache_is_static_and_bucketed(fast, ckpts, reference, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    seen = caches_seen(model, monkeypatch)
    prompt = ids(length=40)
    got = model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, reference.generate(prompt, max_new_tokens=20, do_sample=False))
    assert {type(c).__name__ for c in seen} == {"StaticCache"}
    assert getattr(seen[0], "layers", [seen[0]])[0].max_cache_len == fast_generate.bucket(40 + 20 + 1) == 256
    assert tally(model)["fast"] == 1 and tally(model)["lengths"] == [256]
    assert status(model).startswith("on: 1 call(s) on a static cache"), status(model)


def test_left_padded_batches_and_inputs_embeds_equal_plain_transformers(fast, ckpts, reference):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    batch = ids(batch=3, length=30, seed=1)
    mask = tiny.padding_mask([30, 22, 9], side="left")
    for call in (dict(input_ids=batch, attention_mask=mask),
                 dict(inputs_embeds=model.get_input_embeddings()(batch), attention_mask=mask)):
        got = model.generate(**call, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, reference.generate(**call, max_new_tokens=12, do_sample=False))
    assert tally(model)["fast"] == 2


def test_consecutive_calls_of_other_shapes_leave_nothing_behind(fast, ckpts, reference):
    # The cache is reused across calls (that is what keeps the compiled step): a stale entry would change tokens.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    for batch, length, new in ((2, 50, 10), (1, 7, 30), (2, 12, 5), (1, 120, 8), (1, 3, 16)):
        prompt = ids(batch=batch, length=length, seed=length)
        got = model.generate(prompt, max_new_tokens=new, do_sample=False)
        assert torch.equal(got, reference.generate(prompt, max_new_tokens=new, do_sample=False)), (batch, length)


def test_sampling_with_a_seed_gives_plain_transformers_tokens(fast, ckpts, reference):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    prompt = ids(length=16, seed=4)
    torch.manual_seed(7)
    got = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=10, num_return_sequences=2)
    torch.manual_seed(7)
    assert torch.equal(got, reference.generate(prompt, max_new_tokens=12, do_sample=True, top_k=10, num_return_sequences=2))


def test_generate_changes_nothing_it_does_not_restore(fast, ckpts, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    before = (model.generation_config.to_dict(), model.config._attn_implementation)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    model.generate(ids(), **kwargs)
    assert kwargs == dict(max_new_tokens=5, do_sample=False)  # the caller's dict is not touched
    assert (model.generation_config.to_dict(), model.config._attn_implementation) == before
    with pytest.raises(ValueError):  # the caller's own mistake raises as in plain transformers
        model.generate(ids(), max_new_tokens=5, not_an_argument=1)
    assert (model.generation_config.to_dict(), model.config._attn_implementation) == before
    assert tally(model)["broken"] is None  # ... and is not taken for a failure of the static cache


def test_on_the_flashattention2_emulation_generate_runs_sdpa_and_restores(fast, emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert model.config._attn_implementation == "flash_attention_2"
    model.generate(ids(), max_new_tokens=5, do_sample=False)
    assert tally(model)["fast"] == 1 and emulated.CALLS == {}
    assert model.config._attn_implementation == "flash_attention_2"


# --- what is left alone -------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, reason", [
    (dict(cache_implementation="static"), "cache_implementation='static' is set"),
    (dict(num_beams=2), "beam search"),
    (dict(use_cache=False), "use_cache=False"),
    ("generation_config", "cache_implementation"),
])
def test_the_callers_own_choices_are_left_alone(fast, ckpts, reference, call, reason, caplog):
    if call == "generation_config":
        call = dict(generation_config=GenerationConfig(max_new_tokens=4, cache_implementation="static"))
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    prompt = ids(length=10)
    with caplog.at_level(logging.INFO, logger="panovlm_flashpatch"):
        got = model.generate(prompt, **{"max_new_tokens": 4, **call})
    assert torch.equal(got, reference.generate(prompt, **{"max_new_tokens": 4, **call}))
    assert tally(model)["fast"] == 0 and list(tally(model)["left"]) and reason in next(iter(tally(model)["left"]))
    assert reason in caplog.text and reason in status(model)


def test_a_cache_given_by_the_caller_is_used(fast, ckpts, monkeypatch):
    from transformers import DynamicCache

    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    seen = caches_seen(model, monkeypatch)
    mine = DynamicCache()
    model.generate(ids(), max_new_tokens=4, do_sample=False, past_key_values=mine)
    assert seen and all(c is mine for c in seen)


@needs_compiled_decoding
def test_a_model_off_the_gpu_runs_as_plain_transformers(patched, ckpts, monkeypatch):
    assert panovlm_flashpatch.apply(fast_generate=True)  # DEVICES as shipped: CUDA only
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    seen = caches_seen(model, monkeypatch)
    model.generate(ids(), max_new_tokens=4, do_sample=False)
    assert "StaticCache" not in {type(c).__name__ for c in seen}
    assert "the model is on cpu" in status(model)


@needs_compiled_decoding
def test_the_switch_off_changes_nothing_and_hints_once_after_16_calls(patched, ckpts, monkeypatch, caplog):
    monkeypatch.setattr(fast_generate, "DEVICES", ("cuda", "cpu"))
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    seen = caches_seen(model, monkeypatch)
    with caplog.at_level(logging.INFO, logger="panovlm_flashpatch"):
        for n in range(fast_generate.HINT_AFTER + 3):
            model.generate(ids(), max_new_tokens=2, do_sample=False)
            if n == fast_generate.HINT_AFTER - 2:
                assert "fast_generate=True" not in caplog.text
    assert "StaticCache" not in {type(c).__name__ for c in seen}
    assert caplog.text.count("fast_generate=True") == 1 and "7.3x" in caplog.text
    assert status(model) is None


@needs_compiled_decoding
def test_the_environment_variable_turns_it_on_and_a_bad_value_is_reported(patched, ckpts, monkeypatch, caplog):
    monkeypatch.setattr(fast_generate, "DEVICES", ("cuda", "cpu"))
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    monkeypatch.setenv("PANOVLM_FLASHPATCH_FAST_GENERATE", "1")
    model.generate(ids(), max_new_tokens=2, do_sample=False)
    assert tally(model)["fast"] == 1
    monkeypatch.setenv("PANOVLM_FLASHPATCH_FAST_GENERATE", "fastest")
    with caplog.at_level(logging.WARNING, logger="panovlm_flashpatch"):
        model.generate(ids(), max_new_tokens=2, do_sample=False)
    assert tally(model)["fast"] == 1 and "PANOVLM_FLASHPATCH_FAST_GENERATE='fastest' is not understood" in caplog.text


# --- failures, copies, removal ------------------------------------------------------------------------------


def test_a_static_cache_failure_reruns_the_call_as_written_and_keeps_the_default(fast, ckpts, reference, monkeypatch, caplog):
    from transformers import cache_utils

    def broken(self, *args, **kwargs):
        raise RuntimeError("static cache update failed (simulated)")

    monkeypatch.setattr(cache_utils.StaticCache, "update", broken)
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    prompt = ids(length=9)
    with caplog.at_level(logging.WARNING, logger="panovlm_flashpatch"):
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, reference.generate(prompt, max_new_tokens=6, do_sample=False))
    assert "simulated" in caplog.text and "ran again on transformers' default cache" in caplog.text
    model.generate(prompt, max_new_tokens=6, do_sample=False)  # no second attempt
    assert caplog.text.count("simulated") == 1 and status(model).startswith("unavailable: the static-cache call raised")


def test_a_deepcopy_keeps_its_tally_and_remove_makes_generate_plain(fast, ckpts, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    model.generate(ids(), max_new_tokens=3, do_sample=False)
    twin = copy.deepcopy(model)
    twin.generate(ids(), max_new_tokens=3, do_sample=False)
    assert tally(twin)["fast"] == 2 and tally(model)["fast"] == 1
    panovlm_flashpatch.remove()
    seen = caches_seen(model, monkeypatch)
    model.generate(ids(), max_new_tokens=3, do_sample=False)
    assert "StaticCache" not in {type(c).__name__ for c in seen} and tally(model)["fast"] == 1


@pytest.mark.skipif(fast_generate.sizing() is not None, reason="this transformers compiles the decode step")
def test_unavailable_before_transformers_compiles_the_decode_step(patched, ckpts, monkeypatch, reference):
    monkeypatch.setattr(fast_generate, "DEVICES", ("cuda", "cpu"))
    assert panovlm_flashpatch.apply(fast_generate=True)
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    seen = caches_seen(model, monkeypatch)
    got = model.generate(ids(), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, reference.generate(ids(), max_new_tokens=4, do_sample=False))
    assert "StaticCache" not in {type(c).__name__ for c in seen}
    assert "does not compile generate()'s decode step (4.48 and later do)" in status(model)


# --- compiled for real (TorchDynamo + Inductor on the CPU) --------------------------------------------------


def test_a_varying_length_loop_compiles_once_per_bucket(fast, emulated, ckpts):
    # Fault found on the H200: a counter kept in the plugin's state on the model changed every call, TorchDynamo
    # guards on what the forward wrapper reads there, and every call recompiled until the recompile limit (8), after
    # which transformers' decode step ran uncompiled. Run on the FlashAttention-2 emulation: the per-forward switch's
    # state is read inside the compiled step too.
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    config = compile_everywhere()
    lengths = [30, 90, 60, 120, 45, 200, 33, 100]  # buckets 256, then 512 from 200 on
    before = fast_generate._graphs()
    for n in lengths:  # tokens are compared with plain transformers by the float32 tests above
        model.generate(ids(length=n, seed=n), max_new_tokens=8, do_sample=False, compile_config=config)
    compiled = fast_generate._graphs() - before
    buckets = {fast_generate.bucket(n + 8 + 1) for n in lengths}
    assert buckets == {256, 512} and compiled == tally(model)["compilations"] == len(buckets), status(model)
    assert tally(model)["lengths"] == [256, 512] and "2 compilation(s)" in status(model)
    torch._dynamo.reset()


def test_the_doctor_says_whether_this_transformers_can_take_the_fast_path():
    from panovlm_flashpatch import doctor

    info = doctor.collect()
    assert info["fast_generate.enabled"] is False
    expected = "unavailable" if fast_generate.sizing() is None else "yes"
    assert info["fast_generate.support"].startswith(expected), info["fast_generate.support"]
