"""Real loads through from_pretrained: decisions, retries, pass-through, nothing mutated."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import panovlm_flashpatch
from panovlm_flashpatch import tiny
from panovlm_flashpatch.compat import attention_code
from panovlm_flashpatch.decide import FA2

from conftest import TV, outcome, without_plugin

DTYPE_KW = "dtype" if TV >= (4, 56) else "torch_dtype"


def only(records, component=""):
    (rec,) = [r for r in records if r["component"] == component]
    return rec


# --- with the real probe (this machine: no GPU, no flash-attn) -------------------------------


def test_real_probe_passes_through_with_one_untouched_attempt(patched, ckpts, caplog):
    caplog.set_level(logging.INFO, logger="panovlm_flashpatch")
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="sdpa")
    rec = only(panovlm_flashpatch.report(model))
    assert rec["backend"] == "sdpa" and rec["dtype"] == "float32" and rec["requested"] == "sdpa"
    assert rec["attempts"] == [{"attn_implementation": "sdpa", "dtype": None, "error": None}]
    assert not rec["retried"]
    assert "flash-attn is not installed" in rec["reason"] and "needs a CUDA GPU" in rec["reason"]
    line = [r for r in caplog.records if r.name == "panovlm_flashpatch" and "language model" in r.getMessage()]
    assert len(line) == 1 and line[0].levelno == logging.INFO
    assert "→ sdpa, float32" in line[0].getMessage() and ckpts["lm"] in line[0].getMessage()


@pytest.mark.parametrize("name", ["lm", "siglip_vision", "siglip", "clip_vision", "dinov2", "llava_siglip", "siglip2", "llava_siglip2"])
def test_real_probe_gives_the_same_model_as_plain_transformers(patched, ckpts, name):
    if name not in ckpts:
        pytest.skip("SigLIP2 needs transformers >= 4.49")
    load = lambda: AutoModel.from_pretrained(ckpts[name])  # noqa: E731
    assert outcome(load) == without_plugin(load)
    assert all(len(r["attempts"]) == 1 and r["attempts"][0]["error"] is None for r in panovlm_flashpatch.report())


# --- with the probe faked capable: transformers really refuses (flash-attn absent) ------------


def test_fa2_and_bf16_are_asked_for_then_sdpa_after_the_real_refusal(capable, ckpts, caplog):
    caplog.set_level(logging.INFO, logger="panovlm_flashpatch")
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="sdpa")
    rec = only(panovlm_flashpatch.report(model))
    first, second = rec["attempts"]
    assert first["attn_implementation"] == FA2 and first["dtype"] == "bfloat16"
    assert first["error"].startswith("ImportError") or first["error"].startswith("ValueError")
    assert second == {"attn_implementation": "sdpa", "dtype": None, "error": None}
    assert rec["retried"] and rec["backend"] == "sdpa" and rec["dtype"] == "float32"
    assert "refused at load" in rec["reason"]
    warnings = [r for r in caplog.records if r.name == "panovlm_flashpatch" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "→ sdpa" in warnings[0].getMessage()
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_caller_dtype_is_never_replaced(capable, ckpts, dtype):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], **{DTYPE_KW: dtype})
    rec = only(panovlm_flashpatch.report(model))
    assert rec["attempts"][0]["attn_implementation"] == FA2
    assert rec["attempts"][0]["dtype"] == str(dtype).replace("torch.", "")
    assert rec["dtype"] == str(dtype).replace("torch.", "")


def test_explicit_float32_follows_the_autocast_rule(capable, ckpts):
    # FA2 runs float32 weights under autocast; the per-forward switch gives every other forward to SDPA.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], **{DTYPE_KW: torch.float32})
    rec = only(panovlm_flashpatch.report(model))
    first = rec["attempts"][0]
    assert first["attn_implementation"] == FA2 and first["dtype"] == "float32"
    assert rec["dtype"] == "float32"


@pytest.mark.parametrize("requested", ["eager", "flash_attn2", "flex_attention"])
def test_explicit_choices_pass_through_exactly(capable, ckpts, requested):
    load = lambda: AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation=requested)  # noqa: E731
    with_plugin = outcome(load)
    assert with_plugin == without_plugin(load)
    for rec in panovlm_flashpatch.report():
        assert len(rec["attempts"]) == 1 and rec["attempts"][0]["attn_implementation"] == requested


def test_explicit_choice_through_a_concrete_class_is_read_from_kwargs(capable, ckpts):
    cls = type(AutoModelForCausalLM.from_config(tiny.lm_config()))
    panovlm_flashpatch.clear_report()
    model = cls.from_pretrained(ckpts["lm"], attn_implementation="eager")
    rec = only(panovlm_flashpatch.report(model))
    assert rec["backend"] == "eager" and len(rec["attempts"]) == 1


@pytest.mark.parametrize(
    "load_name",
    ["missing checkpoint", "corrupt weights", "typo in a kwarg of the model"],
)
def test_errors_that_are_not_ours_reach_the_caller_unchanged(capable, ckpts, tmp_path, load_name):
    if load_name == "missing checkpoint":
        load = lambda: AutoModelForCausalLM.from_pretrained(str(tmp_path / "nope"))  # noqa: E731
    elif load_name == "corrupt weights":
        bad = tmp_path / "bad"
        tiny.build_lm(str(bad))
        (bad / "model.safetensors").write_bytes(b"\x00" * 64)
        load = lambda: AutoModelForCausalLM.from_pretrained(str(bad))  # noqa: E731
    else:
        load = lambda: AutoModelForCausalLM.from_pretrained(ckpts["lm"], no_such_option=3)  # noqa: E731
    with_plugin = outcome(load)
    assert with_plugin[0] == "error"
    assert with_plugin == without_plugin(load)


def test_out_of_memory_during_an_upgraded_load_propagates_without_retry(capable, ckpts, monkeypatch):
    calls = []
    original = transformers.PreTrainedModel.__init__

    def oom_init(self, *args, **kwargs):
        calls.append(type(self).__name__)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", oom_init)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 2.00 GiB"):
        AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", original)
    assert len(calls) == 1, "an out-of-memory error must not be retried"


@pytest.mark.parametrize("encoders_fa2", [False, True])
def test_composite_llava_asks_fa2_for_each_tower_that_supports_it(capable, ckpts, monkeypatch, encoders_fa2):
    if encoders_fa2:
        monkeypatch.setenv("PANOVLM_FLASHPATCH_ENCODERS_FA2", "1")
    name = "llava_siglip2" if "llava_siglip2" in ckpts else "llava_siglip"
    model = transformers.LlavaForConditionalGeneration.from_pretrained(ckpts[name])
    records = panovlm_flashpatch.report(model)
    text, vision = only(records, "text_config"), only(records, "vision_config")
    assert text["role"] == "language model" and vision["role"] == "vision encoder"
    asked = records[0]["attempts"][0]["attn_implementation"]
    assert asked["text_config"] == FA2
    tower_class = transformers.SiglipVisionModel if name == "llava_siglip" else transformers.Siglip2VisionModel
    # SigLIP2 lost FA2 support in transformers 5.x; SigLIP before ~4.49 builds its masks for one backend at
    # construction, so it could not fall back per forward (compat.AttentionCode "fixed").
    tower_supports = (name == "llava_siglip" or TV < (5, 4)) and attention_code(tower_class).switchable
    assert (asked.get("vision_config") == FA2) == (tower_supports and encoders_fa2)
    if not tower_supports and name == "llava_siglip2":
        assert "Siglip2VisionModel does not support FlashAttention-2" in vision["reason"] and not vision["retried"]
    if not encoders_fa2:
        assert "encoders keep SDPA" in vision["reason"]
    assert text["retried"] and text["backend"] == "sdpa" and vision["backend"] == "sdpa"


@pytest.mark.parametrize("encoders_fa2", [False, True])
@pytest.mark.parametrize("name, fa2_class", [("siglip_vision", True), ("clip_vision", True), ("dinov2", None), ("siglip2_vision", None)])
def test_vision_encoders(capable, ckpts, monkeypatch, name, fa2_class, encoders_fa2):
    if name not in ckpts:
        pytest.skip("SigLIP2 needs transformers >= 4.49")
    if encoders_fa2:
        monkeypatch.setenv("PANOVLM_FLASHPATCH_ENCODERS_FA2", "1")
    model = AutoModel.from_pretrained(ckpts[name])
    rec = only(panovlm_flashpatch.report(model))
    supported = panovlm_flashpatch.components.supports_fa2(type(model), panovlm_flashpatch.compat.transformers_facts())
    if fa2_class is not None:
        assert supported == fa2_class
    assert rec["role"] == "vision encoder"
    switchable = attention_code(type(model)).switchable
    assert (rec["attempts"][0]["attn_implementation"] == FA2) == (supported and encoders_fa2 and switchable)
    if not supported:
        assert len(rec["attempts"]) == 1 and "does not support FlashAttention-2" in rec["reason"]
    if not encoders_fa2:
        assert len(rec["attempts"]) == 1 and "encoders keep SDPA" in rec["reason"]
    assert rec["backend"] == "sdpa"


class TinyPlainConfig(transformers.PretrainedConfig):
    model_type = "tiny-plain"

    def __init__(self, hidden_size=8, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class TinyPlainModel(transformers.PreTrainedModel):
    """Supports neither FlashAttention-2 nor SDPA."""

    config_class = TinyPlainConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def _init_weights(self, module):
        pass


def test_model_without_fa2_or_sdpa(capable, tmp_path):
    path = str(tmp_path / "plain")
    TinyPlainModel(TinyPlainConfig()).save_pretrained(path)
    model = TinyPlainModel.from_pretrained(path)
    rec = only(panovlm_flashpatch.report(model))
    assert len(rec["attempts"]) == 1 and "TinyPlainModel does not support FlashAttention-2" in rec["reason"]
    assert model.config._attn_implementation == "eager"
    load = lambda: TinyPlainModel.from_pretrained(path, attn_implementation="sdpa")  # noqa: E731
    assert outcome(load)[0] == "error" and outcome(load) == without_plugin(load)


def test_trust_remote_code_class_goes_through_the_wrapper(capable, ckpts):
    model = AutoModel.from_pretrained(ckpts["remote"], trust_remote_code=True)
    rec = only(panovlm_flashpatch.report(model))
    assert type(model).__name__ == "TinyRemoteModel" and rec["loaded_class"] == "TinyRemoteModel"
    assert rec["attempts"][0]["attn_implementation"] == FA2 and rec["backend"] == "sdpa"


def test_output_loading_info_tuple_is_returned_unchanged(capable, ckpts):
    result = AutoModelForCausalLM.from_pretrained(ckpts["lm"], output_loading_info=True)
    assert isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)
    assert only(panovlm_flashpatch.report(result[0]))["backend"] == "sdpa"


def test_output_attentions_keeps_fa2_off(capable, ckpts):
    load = lambda: AutoModelForCausalLM.from_pretrained(ckpts["lm"], output_attentions=True)  # noqa: E731
    assert outcome(load) == without_plugin(load)
    (rec,) = panovlm_flashpatch.report()
    # transformers >= 4.53 turns the request into "eager" itself; before, the plugin's check does.
    assert len(rec["attempts"]) == 1 and rec["attempts"][0]["attn_implementation"] != FA2
    assert "output_attentions" in rec["reason"] or rec["requested"] == "eager"


def test_caller_kwargs_and_a_reused_config_are_never_mutated(capable, ckpts):
    config = AutoConfig.from_pretrained(ckpts["lm"])
    before = (config.to_dict(), config._attn_implementation_internal)
    kwargs = {"config": config, "attn_implementation": "sdpa"}
    snapshot = dict(kwargs)
    cls = type(AutoModelForCausalLM.from_config(tiny.lm_config()))
    first = cls.from_pretrained(ckpts["lm"], **kwargs)
    second = AutoModelForCausalLM.from_pretrained(ckpts["lm"], config=config)
    assert kwargs == snapshot and kwargs["config"] is config
    assert (config.to_dict(), config._attn_implementation_internal) == before
    for model in (first, second):
        rec = only(panovlm_flashpatch.report(model))
        assert rec["attempts"][0]["attn_implementation"] == FA2 and rec["backend"] == "sdpa"


def test_eight_threads_loading_at_once_each_get_their_own_record(capable, ckpts):
    names = ["lm", "siglip_vision", "clip_vision", "lm", "dinov2", "siglip_vision", "lm", "clip_vision"]
    results, errors = {}, []
    barrier = threading.Barrier(len(names))

    def work(i, name):
        try:
            barrier.wait()
            kwargs = {"attn_implementation": "eager"} if i % 4 == 3 else {}
            results[i] = (name, kwargs, AutoModel.from_pretrained(ckpts[name], **kwargs))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name, kwargs, model in results.values():
        rec = only(panovlm_flashpatch.report(model))
        assert rec["checkpoint"] == ckpts[name]
        expected = "eager" if kwargs else "sdpa"
        assert rec["backend"] == expected and model.config._attn_implementation == expected
    assert len(panovlm_flashpatch.report()) == len(names)


def test_re_entrant_load(capable, ckpts, tmp_path):
    class OuterConfig(transformers.PretrainedConfig):
        model_type = "tiny-outer"

        def __init__(self, inner_path=None, **kwargs):
            self.inner_path = inner_path
            super().__init__(**kwargs)

    class OuterModel(transformers.PreTrainedModel):
        """Loads another checkpoint while it is being loaded itself."""

        config_class = OuterConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = torch.nn.Linear(4, 4)
            # Kept out of the module tree: it has its own checkpoint.
            self.__dict__["inner"] = AutoModelForCausalLM.from_pretrained(config.inner_path) if config.inner_path else None
            self.post_init()

        def _init_weights(self, module):
            pass

    path = str(tmp_path / "outer")
    OuterModel(OuterConfig()).save_pretrained(path)
    OuterConfig(inner_path=ckpts["lm"]).save_pretrained(path)
    load = lambda: OuterModel.from_pretrained(path)  # noqa: E731
    plain = without_plugin(load)
    if plain[0] == "error":
        # transformers 5.x refuses a from_pretrained inside another load's meta-device context:
        # the plugin must give the same error, not a different one.
        assert outcome(load) == plain
        return
    panovlm_flashpatch.clear_report()
    model = load()
    checkpoints = [r["checkpoint"] for r in panovlm_flashpatch.report()]
    assert sorted(checkpoints) == sorted([ckpts["lm"], path])
    assert only(panovlm_flashpatch.report(model.inner))["attempts"][0]["attn_implementation"] == FA2


# --- opt-out and settings -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disable_flash_attn_passes_through_untouched(capable, ckpts, monkeypatch, caplog, value):
    monkeypatch.setenv("DISABLE_FLASH_ATTN", value)
    from panovlm_flashpatch import reporting

    reporting.forget_once()
    caplog.set_level(logging.INFO, logger="panovlm_flashpatch")
    load = lambda: AutoModelForCausalLM.from_pretrained(ckpts["lm"])  # noqa: E731
    assert outcome(load) == without_plugin(load)
    outcome(load)
    assert panovlm_flashpatch.report() == []
    assert sum("DISABLE_FLASH_ATTN is set" in r.getMessage() for r in caplog.records) == 1


def test_disable_flash_attn_with_an_unknown_value_is_reported_and_disables(capable, ckpts, monkeypatch, caplog):
    monkeypatch.setenv("DISABLE_FLASH_ATTN", "please")
    caplog.set_level(logging.INFO, logger="panovlm_flashpatch")
    AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert panovlm_flashpatch.report() == []
    assert any("DISABLE_FLASH_ATTN='please' is not understood" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_disable_flash_attn_false_values_keep_the_plugin_on(capable, ckpts, monkeypatch, value):
    monkeypatch.setenv("DISABLE_FLASH_ATTN", value)
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert only(panovlm_flashpatch.report(model))["attempts"][0]["attn_implementation"] == FA2


def test_keep_explicit_sdpa(capable, ckpts, monkeypatch):
    monkeypatch.setenv("PANOVLM_FLASHPATCH_KEEP_SDPA", "1")
    kept = AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="sdpa")
    upgraded = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert len(only(panovlm_flashpatch.report(kept))["attempts"]) == 1
    assert only(panovlm_flashpatch.report(upgraded))["attempts"][0]["attn_implementation"] == FA2
    monkeypatch.delenv("PANOVLM_FLASHPATCH_KEEP_SDPA")
    panovlm_flashpatch.apply(keep_explicit_sdpa=True)  # the API argument wins over the variable
    kept = AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="sdpa")
    assert len(only(panovlm_flashpatch.report(kept))["attempts"]) == 1
    panovlm_flashpatch.apply(keep_explicit_sdpa=None)


# --- report ----------------------------------------------------------------------------------


def test_report_records_are_json_and_complete(capable, ckpts):
    transformers.LlavaForConditionalGeneration.from_pretrained(ckpts["llava_siglip"])
    records = panovlm_flashpatch.report()
    json.loads(json.dumps(records))
    for rec in records:
        assert {"role", "class", "checkpoint", "requested", "backend", "dtype", "attempts", "reason"} <= set(rec)


def test_only_local_rank_zero_logs_at_info(capable, ckpts, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="panovlm_flashpatch")
    monkeypatch.setenv("LOCAL_RANK", "1")
    panovlm_flashpatch.remove()
    monkeypatch.setattr(panovlm_flashpatch.probe, "probe", lambda devices=None: __import__("conftest").caps(flash_attn_error="flash-attn is not installed"))
    panovlm_flashpatch.apply()
    AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    lines = [r for r in caplog.records if "language model" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
    monkeypatch.setenv("LOCAL_RANK", "0")
    AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    lines = [r for r in caplog.records if "language model" in r.getMessage()]
    assert lines[-1].levelno == logging.INFO


def test_local_rank_picks_the_probed_device(patched, ckpts, monkeypatch):
    seen = []
    monkeypatch.setattr(panovlm_flashpatch.probe, "probe", lambda devices=None: seen.append(devices) or __import__("conftest").caps())
    monkeypatch.setenv("LOCAL_RANK", "3")
    AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    AutoModelForCausalLM.from_pretrained(ckpts["lm"], device_map={"": "cpu"}) if False else None
    assert seen == [(3,)]
