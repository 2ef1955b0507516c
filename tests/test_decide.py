"""The decision as a table: request x capabilities x component -> backend, dtype, reason."""

from __future__ import annotations

import pytest

from panovlm_flashpatch.compat import AttentionCode, facts_for
from panovlm_flashpatch.components import Component
from panovlm_flashpatch.decide import FA2, PLUGIN_CONFIG, Placement, Request, decide
from panovlm_flashpatch.settings import Settings

from conftest import FAKE_GPU, caps

NEW = facts_for("5.23.0")
SWITCHABLE = AttentionCode("interface", "transformers.models.qwen3.modeling_qwen3")


def component(key, role, cls, supports=True, head_dim=16, output_attentions=False, attention=SWITCHABLE):
    return Component(key, role, cls, supports, head_dim, output_attentions, attention)


LM = component("", "language model", "Qwen3ForCausalLM", head_dim=128)


def run(request=None, capabilities=None, components=(LM,), placement=Placement(), settings=Settings(), facts=NEW, **req):
    dtype, ckpt = req.get("dtype"), req.get("checkpoint_dtype")
    load_dtype = req.get("load_dtype", (ckpt or "float32") if dtype in (None, "auto") else dtype)
    request = request or Request(attn={c.key: req.get("attn") for c in components}, dtype=dtype, checkpoint_dtype=ckpt,
                                 load_dtype=load_dtype)
    return decide(request, capabilities or caps(), components, placement, settings, facts)


@pytest.mark.parametrize("requested", [None, "sdpa"])
def test_unset_and_sdpa_are_upgraded(requested):
    d = run(attn=requested)
    (c,) = d.choices
    assert (c.backend, c.upgraded) == (FA2, True)
    assert d.attn_argument() == FA2
    assert d.inject_dtype == "bfloat16" and "no dtype given" in d.dtype_note
    assert "Fake H100 (sm_90)" in c.reason


@pytest.mark.parametrize("requested", ["eager", "flex_attention", "flash_attention_3", "kernels-community/flash-attn2", "flash_attn2"])
def test_explicit_choices_are_left_alone(requested):
    d = run(attn=requested)
    (c,) = d.choices
    assert (c.backend, c.upgraded) == (requested, False)
    assert not d.changed and d.inject_dtype is None
    assert repr(requested) in c.reason


def test_keep_explicit_sdpa_setting():
    assert not run(attn="sdpa", settings=Settings(keep_explicit_sdpa=True)).changed
    assert run(attn=None, settings=Settings(keep_explicit_sdpa=True)).changed


@pytest.mark.parametrize("source", ["PANOVLM_FLASHPATCH_KEEP_SDPA=1", "apply(keep_explicit_sdpa=True)"])
def test_the_keep_sdpa_reason_names_the_switch_that_was_used(source):
    # Fault: the reason named PANOVLM_FLASHPATCH_KEEP_SDPA when the option came from apply().
    s = Settings(keep_explicit_sdpa=True, sources={"keep_explicit_sdpa": source})
    (c,) = run(attn="sdpa", settings=s).choices
    assert c.reason == f"caller chose 'sdpa' and {source} keeps it"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(flash_attn_version=None, flash_attn_error="flash-attn is not installed"), "flash-attn is not installed"),
        (dict(flash_attn_error="flash-attn 2.8.3 is installed but its CUDA extension fails to import: ImportError: undefined symbol: _ZN3c10"), "undefined symbol"),
        (dict(flash_attn_version="2.1.0"), "needs flash-attn >= 2.3.3, found 2.1.0"),
        (dict(cuda_available=False, devices=()), "needs a CUDA GPU, found none"),
        (dict(devices=(FAKE_GPU.__class__(0, "Tesla T4", (7, 5), False),)), "needs compute capability >= 8.0, found 7.5 on cuda:0 (Tesla T4)"),
        (dict(flash_attn_version=None, flash_attn_error="flash-attn is not installed", kernels_version="0.12.3"), "flash-attn is not installed"),
    ],
)
def test_environment_blockers_have_reasons_with_values(overrides, expected):
    d = run(capabilities=caps(**overrides))
    (c,) = d.choices
    assert not c.upgraded and c.backend is None
    assert expected in c.reason and expected in c.rejected[FA2]
    assert d.inject_dtype is None


@pytest.mark.parametrize(
    "component, expected",
    [
        (component("", "vision encoder", "Siglip2VisionModel", False, 64), "Siglip2VisionModel does not support FlashAttention-2"),
        (component("", "language model", "BigHead", head_dim=288), "needs head_dim <= 256, found 288"),
        (component("", "language model", "Qwen3ForCausalLM", output_attentions=True), "output_attentions"),
        (component("", "language model", "RemoteLM", attention=AttentionCode("own", "transformers_modules.x.modeling_x")),
         "computes attention in its own code (transformers_modules.x.modeling_x), which calls neither flash-attn"),
        (component("", "language model", "OldLM", attention=AttentionCode("fixed", "m")), "cannot change its attention backend per forward"),
        (component("", "language model", "ReplLM", attention=AttentionCode("unknown")), "cannot read ReplLM's attention code"),
    ],
)
def test_component_blockers(component, expected):
    (c,) = run(components=(component,), settings=Settings(encoders_fa2=True)).choices
    assert not c.upgraded and expected in c.reason


@pytest.mark.parametrize("role", ["vision encoder", "text encoder", "audio encoder"])
def test_encoders_keep_sdpa_unless_asked(role):
    comp = component("", role, "SiglipVisionModel", head_dim=64)
    (c,) = run(components=(comp,)).choices
    assert not c.upgraded and "encoders keep SDPA" in c.reason and "PANOVLM_FLASHPATCH_ENCODERS_FA2=1" in c.reason
    (c,) = run(components=(comp,), settings=Settings(encoders_fa2=True)).choices
    assert c.upgraded and c.backend == FA2


def test_the_encoder_switch_is_named_only_where_it_would_help():
    # Fault: "Siglip2VisionModel does not support FlashAttention-2; ... PANOVLM_FLASHPATCH_ENCODERS_FA2=1 to use it".
    comp = component("", "vision encoder", "Siglip2VisionModel", supports=False)
    (c,) = run(components=(comp,)).choices
    assert "does not support FlashAttention-2" in c.reason and "encoders keep SDPA" in c.reason
    assert "ENCODERS_FA2" not in c.reason


def test_offload_keeps_sdpa():
    placement = Placement(offload="needs every module on a CUDA GPU, found device_map placing modules on cpu")
    (c,) = run(placement=placement).choices
    assert not c.upgraded and "placing modules on cpu" in c.reason


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_explicit_half_dtype_kept(dtype):
    d = run(dtype=dtype)
    assert d.changed and d.inject_dtype is None and f"dtype {dtype} kept" in d.dtype_note


@pytest.mark.parametrize("version", ["4.46.3", "4.57.6", "5.24.0"])
def test_float32_keeps_fa2_with_the_per_forward_fallback_and_injects_nothing(version):
    # The runtime switch (runtime/dispatch.py) gives forwards FA2 cannot run (fp32 outside autocast) to SDPA.
    for request in (dict(dtype="float32"), dict(dtype="auto", checkpoint_dtype="float32")):
        d = run(facts=facts_for(version), **request)
        assert d.changed and d.inject_dtype is None and "autocast" in d.dtype_note


def test_dtype_auto_follows_the_checkpoint():
    d = run(dtype="auto", checkpoint_dtype="bfloat16")
    assert d.changed and d.inject_dtype is None and "bfloat16" in d.dtype_note


@pytest.mark.parametrize("checkpoint", ["float16", "bfloat16"])
def test_no_dtype_injects_bf16_only_where_transformers_would_load_float32(checkpoint):
    # Fault: an fp16 checkpoint loaded with no dtype became bf16 on transformers 5 (which keeps fp16).
    d = run(checkpoint_dtype=checkpoint, load_dtype=checkpoint)
    assert d.changed and d.inject_dtype is None and f"{checkpoint}, the checkpoint's dtype" in d.dtype_note
    assert run(load_dtype="float32").inject_dtype == "bfloat16"


def test_a_float64_load_keeps_sdpa():
    (c,) = run(dtype="float64").choices
    assert not c.upgraded and "found dtype float64" in c.reason


def test_a_request_read_from_a_plugin_config_is_the_callers_original_one():
    # Fault: from_pretrained(other, config=plugin_model.config) logged "caller chose 'flash_attention_2'".
    request = Request(attn={"": None}, load_dtype="float32", requested_from={"": PLUGIN_CONFIG})
    d = run(request=request)
    (c,) = d.choices
    assert c.upgraded and "caller chose" not in c.reason and PLUGIN_CONFIG in c.reason
    blocked = run(request=request, capabilities=caps(cuda_available=False, devices=()))
    # Not upgraded, the caller's own backend is named explicitly (the config says flash_attention_2).
    assert blocked.overrides_config and blocked.attn_argument() == "sdpa"


def test_composite_gets_a_dict_with_only_what_is_set():
    text = component("text_config", "language model", "Qwen3Model")
    vision = component("vision_config", "vision encoder", "Siglip2VisionModel", supports=False, head_dim=8)
    request = Request(attn={"text_config": "sdpa", "vision_config": "sdpa"}, root_attn="sdpa", load_dtype="float32")
    d = decide(request, caps(), (text, vision), Placement(), Settings(), NEW)
    assert d.attn_argument() == {"text_config": FA2, "vision_config": "sdpa", "": "sdpa"}
    unset = decide(Request(attn={"text_config": None, "vision_config": None}, load_dtype="float32"), caps(), (text, vision),
                   Placement(), Settings(), NEW)
    assert unset.attn_argument() == {"text_config": FA2}


def test_giving_back_the_last_fa2_component_drops_the_bf16_injection():
    text = component("text_config", "language model", "Qwen3Model")
    vision = component("vision_config", "vision encoder", "SiglipVisionModel", head_dim=8)
    d = decide(Request(attn={"text_config": None, "vision_config": None}, load_dtype="float32"), caps(), (text, vision),
               Placement(), Settings(encoders_fa2=True), NEW)
    half = d.without_fa2({"vision_config"}, "refused")
    assert half.changed and half.inject_dtype == "bfloat16"
    assert half.attn_argument() == {"text_config": FA2}
    none = half.without_fa2({"text_config"}, "refused")
    assert not none.changed and none.inject_dtype is None
    assert none.choices[0].rejected[FA2] == "refused"


def test_version_facts():
    assert facts_for("4.46.3").dtype_kwarg == "torch_dtype" and facts_for("4.56.0").dtype_kwarg == "dtype"
    assert facts_for("4.53.3").fa2_flags == ("_supports_flash_attn_2",)
    assert set(facts_for("5.0.0").fa2_flags) == {"_supports_flash_attn", "_supports_flash_attn_2"}
    assert facts_for("5.23.0").fa2_flags == ("_supports_flash_attn",)
    assert not facts_for("4.45.2").supported and facts_for("4.46.0").supported and not facts_for("6.0.0").supported


@pytest.mark.parametrize(
    "device_map, local_rank, devices, offload",
    [
        (None, None, None, None),
        (None, "3", (3,), None),
        ("cuda", None, None, None),
        ("cuda:1", None, (1,), None),
        (2, None, (2,), None),
        ("auto", None, None, None),
        ({"": 0}, None, (0,), None),
        ({"model.layers.0": 0, "model.layers.1": "cuda:1", "lm_head": 1}, None, (0, 1), None),
        ("cpu", None, None, "cpu"),
        ({"model": 0, "lm_head": "cpu"}, None, None, "cpu"),
        ({"model": 0, "lm_head": "disk"}, None, None, "disk"),
    ],
)
def test_placement_from_device_map(monkeypatch, device_map, local_rank, devices, offload):
    import torch

    from panovlm_flashpatch.plan import placement_of

    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    kwargs = {} if device_map is None else {"device_map": device_map}
    p = placement_of(kwargs)
    assert p.devices == devices
    assert (offload in p.offload) if offload else p.offload is None
    if isinstance(device_map, str) and device_map.startswith("cuda"):
        assert placement_of({"device_map": torch.device(device_map)}).devices == devices
