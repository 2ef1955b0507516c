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
def lm(tmp_path_factory):
    """A tiny LM whose greedy continuation depends on its context: with the default initialisation (std 0.02) it
    repeats one token whatever it is given, and a cache that leaks another call's keys would go unseen."""
    return tiny.build_lm(str(tmp_path_factory.mktemp("fastgen") / "lm"), initializer_range=0.6,
                         max_position_embeddings=1024)


@pytest.fixture(scope="module")
def reference(lm):
    """Plain transformers on the same checkpoint (loaded with the plugin off)."""
    panovlm_flashpatch.remove()
    return AutoModelForCausalLM.from_pretrained(lm)


@pytest.fixture
def ckpts(lm, ckpts):
    return {**ckpts, "lm": lm}


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
    assert len(set(got[0, 40:].tolist())) > 3, "the continuation must depend on the context for this test to mean anything"
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
    ("model's generation_config", "cache_implementation='dynamic'"),
    ("streamer", "a streamer is given"),
    (dict(return_dict_in_generate=True), "return_dict_in_generate=True"),
    (dict(max_new_tokens=1100), "more than the model's 1024 (max_position_embeddings)"),
])
def test_the_callers_own_choices_are_left_alone(fast, ckpts, reference, call, reason, caplog):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    if call == "generation_config":
        call = dict(generation_config=GenerationConfig(max_new_tokens=4, cache_implementation="static"))
    elif call == "model's generation_config":  # transformers fills a passed config's defaults from the model's
        model.generation_config.cache_implementation = reference.generation_config.cache_implementation = "dynamic"
        call = dict(generation_config=GenerationConfig(do_sample=False))
    elif call == "streamer":
        call = dict(streamer=_Streamer())
    prompt = ids(length=10)
    with caplog.at_level(logging.INFO, logger="panovlm_flashpatch"):
        got = model.generate(prompt, **{"max_new_tokens": 4, "eos_token_id": None, **call})
    try:
        expected = reference.generate(prompt, **{"max_new_tokens": 4, "eos_token_id": None, **call})
    finally:
        reference.generation_config.cache_implementation = None
    if not isinstance(got, torch.Tensor):  # return_dict_in_generate
        got, expected = got.sequences, expected.sequences
    assert torch.equal(got, expected)
    assert tally(model)["fast"] == 0 and list(tally(model)["left"]) and reason in next(iter(tally(model)["left"]))
    assert reason in caplog.text and reason in status(model)


class _Streamer:
    def __init__(self):
        self.values = []

    def put(self, value):
        self.values.append(value)

    def end(self):
        pass


def test_a_passed_generation_config_gets_the_cache_in_a_copy(fast, ckpts, reference, monkeypatch, recwarn, caplog):
    # transformers 5 warns (and means to refuse) a generation config passed together with generation arguments.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    seen = caches_seen(model, monkeypatch)
    config = GenerationConfig(max_new_tokens=7, do_sample=False)
    before = config.to_dict()
    prompt = ids(length=14, seed=5)
    with caplog.at_level(logging.WARNING):
        positional = model.generate(prompt, config)
        keyword = model.generate(prompt, generation_config=config)
    assert torch.equal(positional, reference.generate(prompt, config)) and torch.equal(keyword, positional)
    assert config.to_dict() == before and {type(c).__name__ for c in seen} == {"StaticCache"}
    noise = caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "together with generation-related arguments" not in noise


def test_the_models_generation_config_sizes_the_cache(fast, ckpts, reference, monkeypatch):
    # Fault (adversarial run): the model's max_new_tokens=200 under a passed config that leaves it unset was not
    # read, the cache was sized for 20 new tokens, and the static call overflowed.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    model.generation_config.max_new_tokens = reference.generation_config.max_new_tokens = 200
    seen = caches_seen(model, monkeypatch)
    prompt = ids(length=10, seed=6)
    try:
        got = model.generate(prompt, generation_config=GenerationConfig(do_sample=False), eos_token_id=None)
        assert torch.equal(got, reference.generate(prompt, generation_config=GenerationConfig(do_sample=False),
                                                   eos_token_id=None))
    finally:
        reference.generation_config.max_new_tokens = None
    assert got.shape[1] == 210 and getattr(seen[0], "layers", [seen[0]])[0].max_cache_len == 512
    assert tally(model)["broken"] is None


def test_concurrent_calls_on_one_model_and_a_dtype_change_meet_no_stale_cache(fast, ckpts, reference):
    # Fault (adversarial run, transformers 4.57): one static cache kept per model was reset by a second call while
    # the first still decoded on it (wrong tokens), and reused after model.to(bfloat16) (dtype error).
    import threading

    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    prompts = [ids(length=8 + 5 * i, seed=20 + i) for i in range(6)]
    expected = [reference.generate(p, max_new_tokens=12, do_sample=False) for p in prompts]
    got = [None] * len(prompts)

    def work(i):
        got[i] = model.generate(prompts[i], max_new_tokens=12, do_sample=False)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    model.to(torch.bfloat16)
    model.generate(prompts[0], max_new_tokens=4, do_sample=False)
    assert tally(model)["broken"] is None and tally(model)["fast"] == len(prompts) + 1


def test_an_assistants_generate_inside_assisted_generation_is_not_touched(fast, ckpts, reference):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assistant = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    prompt = ids(length=10, seed=8)
    got = model.generate(prompt, assistant_model=assistant, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, reference.generate(prompt, max_new_tokens=6, do_sample=False))
    assert "assisted generation" in next(iter(tally(model)["left"]))
    assert tally(assistant)["fast"] == 0 and tally(assistant)["dynamic"] == 0  # transformers' inner calls are not ours


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
