"""Never the reason a working program fails (issue 12): each test here is one fault a user met.

Loads go through the real from_pretrained; where FlashAttention-2 must really run, the CPU stand-in
kernel does (tests/emulation.py). Each test names its fault; docs/faults.md lists them.
"""

from __future__ import annotations

import json
import logging
import os
import struct

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM

import panovlm_flashpatch
from panovlm_flashpatch import state, tiny
from panovlm_flashpatch.observe import OWN_CODE
from panovlm_flashpatch.runtime import forward, padding_free

import builders
from conftest import TV

DTYPE_KW = "dtype" if TV >= (4, 56) else "torch_dtype"
FA2 = "flash_attention_2"


def only(records, component=""):
    (rec,) = [r for r in records if r["component"] == component]
    return rec


def safetensors_dtypes(folder) -> set[str]:
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def saved_config_dtype(folder) -> str:
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return config.get("dtype") or config.get("torch_dtype")


def without_plugin_load(path, **kwargs):
    os.environ["DISABLE_FLASH_ATTN"] = "1"
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        del os.environ["DISABLE_FLASH_ATTN"]


# --- item 1: pipeline() of transformers 5 passes dtype="auto" -----------------------------------------------


def test_a_text_classification_pipeline_on_a_float32_phi3_runs(emulated, tmp_path):
    path = builders.build_phi3_classifier(str(tmp_path / "phi3"))
    classify = transformers.pipeline("text-classification", model=path, device="cpu")
    out = classify(["w1 w2 w3", "w4 w5"])  # raised "FlashAttention only support fp16 and bf16 data type"
    assert len(out) == 2 and {"label", "score"} <= set(out[0])
    rec = only(panovlm_flashpatch.report(classify.model))
    assert rec["role"] == "language model" and rec["backend"] == FA2
    if TV >= (5, 0):  # pipelines of transformers 5 load with dtype="auto": the checkpoint's float32
        assert rec["dtype"] == "float32" and emulated.CALLS == {}


# --- item 2: save_pretrained keeps the checkpoint's dtype -------------------------------------------------------


def test_save_after_a_bf16_injection_writes_the_checkpoints_float32(emulated, ckpts, tmp_path, caplog):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert model.dtype == torch.bfloat16
    caplog.set_level(logging.WARNING, logger="panovlm_flashpatch")
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert safetensors_dtypes(out) == {"F32"} and saved_config_dtype(out) == "float32"  # before: BF16, bfloat16
    model.save_pretrained(tmp_path / "again")
    said = [r.getMessage() for r in caplog.records if "save_pretrained wrote float32" in r.getMessage()]
    assert len(said) == 1 and "dtype=torch.float32" in said[0]  # once per model, naming the fix
    assert model.dtype == torch.bfloat16  # the model in memory is untouched
    reloaded = without_plugin_load(str(out))
    assert reloaded.dtype == torch.float32
    for (name, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a.float(), b), name  # the bf16 values, written as float32
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()  # still tied


def test_the_save_mechanism_on_every_supported_version(patched, ckpts, tmp_path):
    # The same feature armed by hand (no FlashAttention-2 load is possible here before transformers 4.54).
    from panovlm_flashpatch.runtime import save

    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], **{DTYPE_KW: torch.bfloat16})
    save.arm(model, "float32", "bfloat16", ckpts["lm"])
    model.save_pretrained(tmp_path / "s", safe_serialization=True)
    assert safetensors_dtypes(tmp_path / "s") == {"F32"} and saved_config_dtype(tmp_path / "s") == "float32"
    reloaded = without_plugin_load(str(tmp_path / "s"))
    assert reloaded.dtype == torch.float32
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_save_keeps_a_dtype_the_user_chose_after_the_load(emulated, ckpts, tmp_path, caplog):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"]).half()
    caplog.set_level(logging.WARNING, logger="panovlm_flashpatch")
    model.save_pretrained(tmp_path / "half")
    assert safetensors_dtypes(tmp_path / "half") == {"F16"} and not caplog.records


def test_peft_merge_and_unload_then_save_writes_float32(emulated, ckpts, tmp_path):
    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    merged = lora.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert safetensors_dtypes(tmp_path / "merged") == {"F32"} and saved_config_dtype(tmp_path / "merged") == "float32"


# --- item 3: an fp16 checkpoint with no dtype --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_checkpoint_with_no_dtype_keeps_what_transformers_loads(capable, tmp_path, dtype):
    path = builders.build_lm_in(str(tmp_path / "half"), dtype)
    expected = without_plugin_load(path).dtype  # 5.x: the checkpoint's dtype; 4.x: float32
    model = AutoModelForCausalLM.from_pretrained(path)
    first = only(panovlm_flashpatch.report(model))["attempts"][0]
    assert first["attn_implementation"] == FA2
    if expected == torch.float32:
        assert first["dtype"] == "bfloat16"  # transformers would load float32: bf16 is injected
    else:
        assert first["dtype"] is None  # before: bfloat16 injected over a float16 checkpoint on transformers 5
        assert model.dtype == expected


# --- item 4: text and audio encoders are not language models ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(builders.encoder_configs()))
def test_text_and_audio_encoders_keep_sdpa_and_their_dtype(capable, tmp_path, name):
    path, class_name = builders.build_encoder(str(tmp_path / name), name)
    model = getattr(transformers, class_name).from_pretrained(path)
    rec = only(panovlm_flashpatch.report(model))
    assert rec["role"] in ("text encoder", "audio encoder"), rec["role"]  # before: "language model"
    assert rec["backend"] != FA2 and rec["dtype"] == "float32" and len(rec["attempts"]) == 1
    assert "encoders keep SDPA" in rec["reason"] or "does not support FlashAttention-2" in rec["reason"]


def test_a_decoder_with_a_vocabulary_is_still_a_language_model(capable, ckpts):
    rec = only(panovlm_flashpatch.report(AutoModelForCausalLM.from_pretrained(ckpts["lm"])))
    assert rec["role"] == "language model"


# --- item 6: remove() during a load ------------------------------------------------------------------------------


def test_remove_during_a_load_leaves_nothing_wrapped_or_armed(patched, ckpts):
    base = type(AutoModelForCausalLM.from_config(tiny.lm_config()))

    class RemovesWhileLoading(base):
        def __init__(self, config):
            super().__init__(config)
            panovlm_flashpatch.remove()  # e.g. another thread, mid-load

    assert panovlm_flashpatch.apply(padding_free=True)
    model = RemovesWhileLoading.from_pretrained(ckpts["lm"])
    assert forward.installed_classes() == []  # before: the causal LM's forward stayed wrapped
    assert not padding_free.is_armed(model) and "padding_free" not in (state.of(model) or {})
    assert not panovlm_flashpatch.is_applied()


# --- item 11: messages --------------------------------------------------------------------------------------------


def test_reasons_are_never_cut_mid_word():
    from panovlm_flashpatch.reporting import sentence

    long = "OSError: " + "a" * 20 + " could not find config.json in a very long path " * 12
    cut = sentence(long, limit=120)
    assert cut.endswith(" …") and len(cut) <= 122 and cut[:-2].split()[-1] in long.split()
    assert sentence("First sentence here. Second one.") == "First sentence here."


def test_the_keep_sdpa_reason_names_apply_when_apply_set_it(capable, ckpts):
    assert panovlm_flashpatch.apply(keep_explicit_sdpa=True)
    rec = only(panovlm_flashpatch.report(AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="sdpa")))
    assert rec["reason"] == "caller chose 'sdpa' and apply(keep_explicit_sdpa=True) keeps it"


def test_report_of_a_model_is_read_from_the_model_now(emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    model.half()
    rec = only(panovlm_flashpatch.report(model))
    assert (rec["dtype"], rec["loaded_dtype"]) == ("float16", "bfloat16")
    model.to(torch.float32)
    assert only(panovlm_flashpatch.report(model))["dtype"] == "float32"
    model.set_attn_implementation("eager")
    rec = only(panovlm_flashpatch.report(model))
    assert (rec["backend"], rec["loaded_backend"]) == ("eager", FA2)
    # report() of every load keeps what each load gave.
    assert only(panovlm_flashpatch.report())["dtype"] == "bfloat16"


# --- item 12: Lightning keeps modules in eval mode ---------------------------------------------------------------


def _padded(labels=True):
    mask = tiny.padding_mask((8, 5, 3), 8)
    ids = torch.randint(1, 120, mask.shape).masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


@pytest.mark.skipif(not padding_free.sdpa_separates_packed(), reason="SDPA keeps packed sequences apart from 4.53")
def test_a_training_step_of_a_model_left_in_eval_mode_is_packed(patched, ckpts, caplog):
    reference = without_plugin_load(ckpts["lm"], attn_implementation="sdpa")
    assert panovlm_flashpatch.apply(padding_free=True)
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="sdpa")
    assert not model.training  # from_pretrained returns eval mode; Lightning keeps it
    seen = []
    model.base_model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape[0]), with_kwargs=True)
    torch.manual_seed(0)
    batch = _padded()
    caplog.set_level(logging.INFO, logger="panovlm_flashpatch")
    loss = model(**batch).loss
    assert seen == [1], "a forward recording gradients with labels is a training step: packed"
    assert abs(loss.item() - reference(**batch).loss.item()) < 1e-5
    assert any("is in eval mode but records gradients and has labels" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        model(**batch)  # validation: padded, silently
    model(**_padded(labels=False))  # the caller's own loss from the logits: padded, and said once why
    assert seen[1:] == [3, 3]
    assert sum("in eval mode and the forward has no labels" in r.getMessage() for r in caplog.records) == 1


# --- item 13: remote code that computes attention itself --------------------------------------------------------


def test_remote_code_with_its_own_attention_is_not_reported_as_flashattention2(capable, tmp_path):
    path = builders.build_own_attention_remote_code(str(tmp_path / "own"))
    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    rec = only(panovlm_flashpatch.report(model))
    assert rec["backend"] == OWN_CODE and rec["dtype"] == "float32"  # before: flash_attention_2, bfloat16
    assert len(rec["attempts"]) == 1 and "computes attention in its own code" in rec["reason"]


@pytest.mark.skipif(not hasattr(transformers, "PaliGemmaForConditionalGeneration"), reason="needs PaliGemma")
def test_a_vlm_with_a_bidirectional_prefix_mask_keeps_it(emulated, tmp_path):
    # Fault: PaliGemma's text tower was put on FlashAttention-2 through the per-sub-config dict, which drops the
    # bidirectional mask over its image and prompt prefix (transformers 5 refuses FA2 for the class itself).
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, projection_dim=64)
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=299,
                                          projection_dim=64, hidden_size=64)
    torch.manual_seed(0)
    transformers.PaliGemmaForConditionalGeneration(config).save_pretrained(tmp_path / "pg")
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "pg")
    records = panovlm_flashpatch.report(model)
    assert all(r["backend"] != FA2 for r in records), [(r["component"], r["backend"]) for r in records]
    text_record = only(records, "text_config")
    assert "PaliGemmaForConditionalGeneration" in text_record["reason"] and len(text_record["attempts"]) == 1


def test_training_on_injected_bf16_weights_says_so_once(emulated, ckpts, caplog):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"]).train()
    caplog.set_level(logging.WARNING, logger="panovlm_flashpatch")
    batch = tiny.lm_inputs()
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    said = [r.getMessage() for r in caplog.records if "optimizer updates smaller than" in r.getMessage()]
    assert len(said) == 1 and "dtype=torch.float32" in said[0]
    model.eval()
    with torch.no_grad():
        model(**batch)  # inference on bf16 weights: nothing to say
    assert len([r for r in caplog.records if "optimizer updates" in r.getMessage()]) == 1


def test_remote_code_whose_attention_subclass_runs_its_own_forward_is_left_alone(capable, tmp_path):
    # Fault: the check read only "class ...Attention(nn.Module)"; a subclass of Qwen3Attention with its own forward
    # was put on FlashAttention-2 (no kernel call) and a padded batch raised a shape error.
    path = builders.build_subclassed_attention_remote_code(str(tmp_path / "sub"))
    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    rec = only(panovlm_flashpatch.report(model))
    assert rec["backend"] == OWN_CODE and len(rec["attempts"]) == 1 and rec["dtype"] == "float32"
    assert "computes attention in its own code" in rec["reason"]


def test_a_loss_counting_padding_positions_is_named_once(emulated, ckpts, caplog):
    # FlashAttention-2 computes nothing at padding positions, SDPA does: such a loss differs between them.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"]).train()
    caplog.set_level(logging.WARNING, logger="panovlm_flashpatch")
    batch = _padded(labels=False)
    for _ in range(2):
        model(**batch, labels=batch["input_ids"])  # labels=input_ids: pads counted
    said = [r.getMessage() for r in caplog.records if "counts predictions at padding positions" in r.getMessage()]
    assert len(said) == 1 and "-100" in said[0]
