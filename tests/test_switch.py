"""The per-forward switch (runtime/dispatch.py): a model the plugin put on FlashAttention-2 runs every forward
plain transformers runs, on the backend that can run it; copies keep it; torch.compile passes through.

FlashAttention-2 runs here for real through transformers' own FA2 path, on the CPU stand-in kernel
(tests/emulation.py, transformers >= 4.54); the kernel refuses float32 exactly as the CUDA kernel does,
so every "runs" below would raise "FlashAttention only support fp16 and bf16 data type" without the switch.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import panovlm_flashpatch
from panovlm_flashpatch import state, tiny
from panovlm_flashpatch.runtime import dispatch, padding_free

from conftest import TV

DTYPE_KW = "dtype" if TV >= (4, 56) else "torch_dtype"
FA2 = "flash_attention_2"


def plain(path, **kwargs):
    """The same load as plain transformers makes it (the reference, on SDPA): the off switch passes it through."""
    os.environ["DISABLE_FLASH_ATTN"] = "1"
    try:
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    finally:
        del os.environ["DISABLE_FLASH_ATTN"]


def logits(model, **extra):
    with torch.no_grad():
        return model(**tiny.lm_inputs(), **extra).logits.float()


def backends_seen(model, call):
    """The backend the decoder's config held at every layer call (hooks see what the layers read)."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(m.self_attn.config._attn_implementation))
             for layer in model.base_model.layers]
    try:
        call()
    finally:
        for hook in hooks:
            hook.remove()
    return set(seen)


# --- item 1: forwards FlashAttention-2 cannot run --------------------------------------------------------


def test_a_float32_load_with_dtype_auto_runs_its_forwards_on_sdpa(emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], **{DTYPE_KW: "auto"})  # what pipelines pass
    rec = panovlm_flashpatch.report(model)[0]
    assert (rec["backend"], rec["dtype"]) == (FA2, "float32") and rec["phases"]["float32 outside autocast"] == "sdpa"
    got = logits(model)  # raised "FlashAttention only support fp16 and bf16 data type" before the switch
    assert emulated.CALLS == {}
    assert torch.allclose(got, logits(plain(ckpts["lm"])), atol=1e-5)


@pytest.mark.skipif(TV < (5, 0), reason="transformers 4.x's FA2 path reads CUDA's autocast only; the stand-in runs on the CPU")
def test_float32_under_autocast_runs_flashattention2(emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], **{DTYPE_KW: torch.float32})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits(model)
    assert emulated.CALLS["flash_attn_func"] == 2  # one call per layer
    assert torch.allclose(got, logits(plain(ckpts["lm"])), atol=0.05)


def test_a_model_moved_to_float32_after_the_load_runs(emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert model.dtype == torch.bfloat16
    logits(model)
    assert emulated.CALLS["flash_attn_func"] == 2
    model.to(torch.float32)
    emulated.CALLS.clear()
    got = logits(model)
    assert emulated.CALLS == {} and torch.allclose(got, logits(plain(ckpts["lm"])), atol=0.05)
    model.to(torch.bfloat16)  # back in half precision: FlashAttention-2 again
    logits(model)
    assert emulated.CALLS["flash_attn_func"] == 2


def test_off_the_gpu_the_model_runs_its_fallback(emulated, ckpts, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    monkeypatch.setattr(dispatch, "FA2_DEVICES", ("cuda",))  # the stand-in's CPU is "off the GPU" again
    logits(model)
    assert emulated.CALLS == {}
    assert panovlm_flashpatch.report(model)[0]["phases"]["off the GPU"] == "sdpa"


def test_a_config_handed_on_from_a_plugin_load_is_not_the_callers_choice(emulated, ckpts):
    first = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    second = AutoModelForCausalLM.from_pretrained(ckpts["lm"], config=first.config)
    rec = panovlm_flashpatch.report(second)[0]
    assert "caller chose" not in rec["reason"] and rec["requested"] is None
    assert rec["requested_from"] == "the config of an earlier plugin load"
    assert rec["backend"] == FA2 and rec["phases"]
    second.float()
    logits(second)  # a float32 forward on a model whose config said flash_attention_2


def test_the_plugins_choice_is_undone_where_the_next_load_is_not_upgraded(emulated, ckpts, monkeypatch):
    first = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    monkeypatch.setenv("PANOVLM_FLASHPATCH_KEEP_SDPA", "1")  # irrelevant here; the caller had asked for nothing
    monkeypatch.setattr(panovlm_flashpatch.probe, "probe", lambda devices=None: __import__("conftest").caps(
        cuda_available=False, devices=()))
    second = AutoModelForCausalLM.from_pretrained(ckpts["lm"], config=first.config)
    rec = panovlm_flashpatch.report(second)[0]
    assert rec["backend"] == "sdpa" and rec["attempts"][-1]["attn_implementation"] == "sdpa"
    logits(second.float())


def test_output_attentions_at_call_time_gives_what_plain_transformers_gives(emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    with torch.no_grad():
        got = model(**tiny.lm_inputs(), output_attentions=True).attentions
        expected = plain(ckpts["lm"])(**tiny.lm_inputs(), output_attentions=True).attentions
    assert emulated.CALLS == {}  # on FlashAttention-2 they would be missing whatever transformers does on SDPA
    assert (got is None) == (expected is None)
    if expected is not None:
        assert [a is None for a in got] == [a is None for a in expected]
        for a, b in zip(got, expected):
            assert a is None or torch.allclose(a.float(), b, atol=0.02)


def test_gradient_checkpointing_recomputes_on_the_forwards_backend(emulated, ckpts):
    reference = plain(ckpts["lm"]).train()
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], **{DTYPE_KW: torch.float32}).train()
    for m in (reference, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = tiny.lm_inputs()
    losses = []
    for m in (reference, model):
        loss = m(**batch, labels=batch["input_ids"]).loss
        loss.backward()  # re-runs each layer: on FlashAttention-2 it would refuse float32
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


# --- item 5: generate() ----------------------------------------------------------------------------------


def generate(model, **kwargs):
    with torch.no_grad():
        return model.generate(**tiny.lm_inputs(batch=1, length=4), max_new_tokens=3, do_sample=False, pad_token_id=0,
                              **kwargs)


def test_generate_runs_on_sdpa_and_the_next_forward_on_flashattention2(emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert backends_seen(model, lambda: generate(model)) == {"sdpa"}
    assert emulated.CALLS == {}
    logits(model)
    assert emulated.CALLS["flash_attn_func"] == 2
    assert panovlm_flashpatch.report(model)[0]["backend"] == FA2


def test_generate_fa2_keeps_flashattention2(emulated, ckpts, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    monkeypatch.setenv("PANOVLM_FLASHPATCH_GENERATE_FA2", "1")
    assert backends_seen(model, lambda: generate(model)) == {FA2}


def test_generate_leaves_a_backend_the_user_set_alone(emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    model.set_attn_implementation("eager")
    assert backends_seen(model, lambda: generate(model)) == {"eager"}
    assert model.config._attn_implementation == "eager"  # before: put back to flash_attention_2
    logits(model)
    assert model.config._attn_implementation == "eager" and emulated.CALLS == {}
    rec = panovlm_flashpatch.report(model)[0]
    assert rec["backend"] == "eager" and rec["loaded_backend"] == FA2


def test_a_callers_explicit_flashattention2_is_not_switched_in_generate(emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation=FA2, **{DTYPE_KW: torch.bfloat16})
    assert backends_seen(model, lambda: generate(model)) == {FA2}
    assert emulated.CALLS  # the caller's kernel ran, as they asked
    assert panovlm_flashpatch.report(model)[0]["phases"] == {}


def test_generate_that_raises_leaves_the_model_on_its_backend(emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    with pytest.raises(Exception):
        model.generate(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=-5)
    logits(model)
    assert emulated.CALLS["flash_attn_func"] == 2


# --- item 6: copies keep what the plugin armed ------------------------------------------------------------


def _copies(model):
    yield "deepcopy", copy.deepcopy(model)
    yield "pickle", pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    yield "torch.save", torch.load(buffer, weights_only=False)


def test_copies_keep_the_switch_padding_free_and_the_records(emulated, ckpts):
    assert panovlm_flashpatch.apply(padding_free=True)
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    for how, twin in _copies(model):
        assert panovlm_flashpatch.report(twin) == panovlm_flashpatch.report(model), how
        assert padding_free.is_armed(twin), how
        emulated.CALLS.clear()
        assert backends_seen(twin, lambda: generate(twin)) == {"sdpa"}, how
        twin.float()
        logits(twin)  # the switch travelled too
        assert emulated.CALLS == {}, how


def test_a_pickled_model_loads_where_the_plugin_is_not_installed(emulated, ckpts, tmp_path):
    # Also the fault: the pickle carried the plugin's flash_attention_2 into a process without flash-attn.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert state.of(model)["records"] and model.config._attn_implementation == FA2
    path = tmp_path / "model.pt"
    torch.save(model, path)
    code = ("import sys, torch; sys.modules['panovlm_flashpatch'] = None\n"  # any import of ours would fail
            f"m = torch.load({str(path)!r}, weights_only=False)\n"
            "print(m(input_ids=torch.tensor([[1, 2, 3]])).logits.shape)")
    env = {**os.environ, "PANOVLM_FLASHPATCH_AUTO": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 3, 128])" in done.stdout


# --- item 7: torch.compile ---------------------------------------------------------------------------------


@pytest.mark.parametrize("armed", ["padding-free", "flashattention-2 switch"])
def test_torch_compile_fullgraph_passes_through(request, ckpts, armed):
    if armed == "padding-free":
        request.getfixturevalue("patched")
        assert panovlm_flashpatch.apply(padding_free=True)
        model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
        assert padding_free.is_armed(model)
    else:
        request.getfixturevalue("emulated")
        model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
        assert state.of(model.base_model)["dispatch"]
    model.train()
    batch = tiny.lm_inputs()  # with its attention mask: transformers' FA2 mask helper alone refuses fullgraph
    eager_loss = model(**batch, labels=batch["input_ids"]).loss
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    loss = compiled(**batch, labels=batch["input_ids"]).loss  # failed on padding-free's RLock before
    assert torch.allclose(loss, eager_loss, atol=1e-2)
    torch._dynamo.reset()


# --- the mechanism on families with one class per backend (transformers 4.46-4.47) -------------------------


@pytest.mark.skipif(TV >= (4, 48), reason="one attention class per backend: transformers < 4.48")
def test_legacy_families_swap_their_attention_classes(patched, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="sdpa")
    reference = plain(ckpts["lm"])
    reference.config._attn_implementation = "eager"
    layers = [f"model.layers.{i}.self_attn" for i in range(2)]
    shared = {"key": "", "loaded": "sdpa", "fallback": "eager", "current": "sdpa", "kind": "classes"}
    armed = {"spec": shared, "attention": layers, "probe": None}
    dispatch._switch(model, armed, shared, "eager")
    assert {type(model.get_submodule(p)).__name__ for p in layers} == {"Qwen2Attention"}
    assert model.config._attn_implementation == "eager"
    eager_ref = AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="eager")
    assert torch.allclose(logits(model), logits(eager_ref), atol=1e-5)
    dispatch._switch(model, armed, shared, "sdpa")
    assert {type(model.get_submodule(p)).__name__ for p in layers} == {"Qwen2SdpaAttention"}
    assert dispatch.sibling(transformers.models.qwen2.modeling_qwen2.Qwen2FlashAttention2, "sdpa").__name__ == "Qwen2SdpaAttention"


def test_a_float32_model_compiled_outside_autocast_traces_its_fallback(emulated, ckpts):
    # Plain transformers compiles SDPA here; a graph traced on FlashAttention-2 would refuse float32.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], **{DTYPE_KW: torch.float32})
    ids = tiny.lm_inputs()["input_ids"]
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(input_ids=ids).logits
        expected = plain(ckpts["lm"])(input_ids=ids).logits
    assert emulated.CALLS == {} and torch.allclose(got, expected, atol=1e-5)
    torch._dynamo.reset()


def test_generate_with_a_static_cache_runs_on_sdpa_with_the_same_tokens(emulated, ckpts):
    # A static cache makes transformers build the masks outside the forwards: the switch happens at generate() entry.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    reference = plain(ckpts["lm"], **{DTYPE_KW: torch.bfloat16})
    got = generate(model, cache_implementation="static")
    assert emulated.CALLS == {}
    assert torch.equal(got, generate(reference, cache_implementation="static"))


def test_the_users_sdpa_after_generate_stays_sdpa(emulated, ckpts):
    # Fault: after generate() the switch held "sdpa"; the user's set_attn_implementation("sdpa") looked like the
    # switch's own, and the next forward went back to FlashAttention-2.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    generate(model)
    assert model.config._attn_implementation == FA2  # generate() returned: back on what the plugin loaded
    model.set_attn_implementation("sdpa")
    logits(model)
    assert emulated.CALLS == {} and model.config._attn_implementation == "sdpa"
    assert panovlm_flashpatch.report(model)[0]["backend"] == "sdpa"


def test_a_copy_carries_the_callers_backend_and_switches_back_in_process(emulated, ckpts):
    # Fault: a pickled model carried the plugin's flash_attention_2 in its config into processes without flash-attn.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    twin = pickle.loads(pickle.dumps(model))
    assert twin.config._attn_implementation == "sdpa"  # what plain transformers' pickle would carry
    assert model.config._attn_implementation == FA2  # the original is untouched
    logits(twin)
    assert emulated.CALLS["flash_attn_func"] == 2  # here, the switch brings FlashAttention-2 back


@pytest.mark.parametrize("how", ["from_config", "deepcopy"])
def test_a_config_copied_from_a_plugin_model_carries_the_callers_backend(emulated, ckpts, how):
    # Fault: from_config(model.config) built an unmanaged flash_attention_2 model (float32 forwards then failed), and
    # from_pretrained(config=copy.deepcopy(model.config)) logged "caller chose 'flash_attention_2'".
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    if how == "from_config":
        other = AutoModelForCausalLM.from_config(model.config)
        assert other.config._attn_implementation == "sdpa"
    else:
        other = AutoModelForCausalLM.from_pretrained(ckpts["lm"], config=copy.deepcopy(model.config),
                                                     **{DTYPE_KW: torch.float32})
        assert "caller chose" not in panovlm_flashpatch.report(other)[0]["reason"]
    logits(other.float())
