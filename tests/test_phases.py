"""Per-phase backends (issue 13): what each phase runs, measured-faster defaults, and the report that says why.

* padded training forwards on FlashAttention-2 are packed by default (padding_free "auto"); SDPA ones are not;
* a batch-1 training forward of an FA2 language model runs SDPA with its flash kernel first (measured faster on
  sm_90), with the same loss;
* an SDPA training forward of a new shape runs with cuDNN's SDPA kernel off (runtime/sdpa_order.py), only in
  models the plugin loaded and left on SDPA, and never changes a setting the user made;
* ``report()["by_phase"]``, the log line and the doctor give each phase's backend and the reason.

FlashAttention-2 runs for real through transformers' FA2 path on the CPU stand-in kernel (tests/emulation.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.utils._python_dispatch
import transformers
from transformers import AutoModelForCausalLM

import panovlm_flashpatch
from panovlm_flashpatch import backends, tiny
from panovlm_flashpatch import probe as probe_module
from panovlm_flashpatch.runtime import padding_free

from conftest import TV, caps
from test_padding_free import DecoderSpy, padded_batch, run

FA2 = "flash_attention_2"


def _plain(path, **kwargs):
    panovlm_flashpatch.remove()
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        assert panovlm_flashpatch.apply()


# --- padded training: packed by default on FlashAttention-2 ----------------------------------------------------


def test_padding_free_is_on_by_default_for_flashattention2_forwards(emulated, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    assert padding_free.is_armed(model)
    rec = panovlm_flashpatch.report(model)[0]
    assert "padding-free on (default" in rec["padding_free"]
    assert rec["by_phase"]["padded training"]["backend"] == f"{FA2} + packing"
    spy = DecoderSpy(model)
    model(**padded_batch("right")).loss.backward()
    assert spy.batches == [1], "the padded FlashAttention-2 forward was not packed by default"
    # float32 outside autocast: the switch runs SDPA, and by default SDPA forwards stay padded
    model.to(torch.float32)
    spy.batches.clear()
    model(**padded_batch("right")).loss.backward()
    assert spy.batches == [4]


def test_the_default_packed_forward_equals_the_padded_one(emulated, ckpts, monkeypatch):
    packed = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    monkeypatch.setenv("PANOVLM_FLASHPATCH_PADDING_FREE", "0")
    padded = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    batch = padded_batch("right")
    expected, got = run(padded, batch), run(packed, batch)
    assert abs(got[1].item() - expected[1].item()) <= 0.01 * abs(expected[1].item())
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[2][real].float(), expected[2][real].float(), atol=0.05)
    assert not got[2][~real].any()  # what differs: zeros at padding positions


class _OpCensus(torch.utils._python_dispatch.TorchDispatchMode):
    """Every ATen op a step runs, in order, with the shape of its first tensor argument: the device work."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.ops.append((str(func), tuple(first.shape) if first is not None else None))
        return func(*args, **(kwargs or {}))


def _census(options, path, batch):
    """The ops of one padded training step (after a first one) of a model loaded under ``apply(**options)``."""
    panovlm_flashpatch.remove()
    assert panovlm_flashpatch.apply(**options)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).train()
    spy = DecoderSpy(model)
    run(model, batch)  # what arms at a first forward
    spy.batches.clear()
    census = _OpCensus()
    with census:
        run(model, batch)
    return spy.batches, census.ops


def test_the_default_does_the_device_work_of_fa2_with_packing(emulated, ckpts):
    """benchmarks/workloads.py's ``default`` arm against ``fa2_pf`` (padding_free=True, sdpa_flash_first=False): at
    batch > 1 the default's extra features (the SDPA order, batch-1 routing, auto packing) add no op, no sync and
    no copy to a training step, so their throughputs differ by the machine's noise only (ten same-batch pairs on
    the H200 ran 0.92x to 1.19x of each other per window, 0.99x in the steady state on geometric mean:
    benchmarks/results/workloads/session5)."""
    batch = padded_batch("right")
    rows, default = _census({}, ckpts["lm"], batch)
    assert rows == [1], "the default did not pack"
    rows, fa2_pf = _census({"padding_free": True, "sdpa_flash_first": False}, ckpts["lm"], batch)
    assert rows == [1] and len(default) > 100 and default == fa2_pf
    _, padded = _census({"padding_free": False}, ckpts["lm"], batch)
    assert padded != default  # the census sees a difference in the work


def test_padding_free_zero_is_the_opt_out(emulated, ckpts, monkeypatch):
    monkeypatch.setenv("PANOVLM_FLASHPATCH_PADDING_FREE", "0")
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    assert not padding_free.is_armed(model)
    rec = panovlm_flashpatch.report(model)[0]
    assert rec["by_phase"]["padded training"]["backend"] == FA2
    assert "PANOVLM_FLASHPATCH_PADDING_FREE=0" in rec["by_phase"]["padded training"]["why"]
    spy = DecoderSpy(model)
    model(**padded_batch("right")).loss.backward()
    assert spy.batches == [4]


def test_without_flashattention2_nothing_is_packed_by_default(patched, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"]).train()
    assert not padding_free.is_armed(model)
    assert panovlm_flashpatch.report(model)[0]["padding_free"] is None


# --- unpadded training: batch 1 of an FA2 language model runs SDPA with its flash kernel first ----------------


@pytest.fixture
def h200(monkeypatch, emulated):
    """The emulated FlashAttention-2 on a machine probed as sm_90, where the batch-1 routing was measured."""
    return emulated


def test_a_batch_1_training_forward_runs_sdpa_flash_first_and_gives_the_same_loss(h200, ckpts, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    rec = panovlm_flashpatch.report(model)[0]
    assert rec["by_phase"]["unpadded training"]["backend"].startswith(backends.SDPA_FLASH_FIRST + " at batch 1")
    assert rec["phases"]["batch-1 training"] == "sdpa"
    ids = torch.randint(0, 120, (1, 12))
    h200.CALLS.clear()
    seen = _cudnn_seen(model, [lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             labels=ids).loss.backward()], monkeypatch)
    assert seen == [{False}] and not h200.CALLS  # SDPA ran, with cuDNN's kernel off; flash-attn never
    loss = model(input_ids=ids, labels=ids).loss
    fa2 = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    with torch.no_grad():
        reference = fa2(input_ids=ids, labels=ids).loss  # no gradients: not a training forward, stays on FA2
    assert h200.CALLS.get("flash_attn_func")
    assert torch.allclose(loss, reference, atol=2e-2)


def test_batch_1_forwards_that_are_not_one_plain_row_stay_on_flashattention2(h200, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    ids = torch.randint(0, 120, (1, 12))
    for extra in ({"position_ids": torch.arange(12)[None]},  # the caller's positions may hold packed sequences
                  {"input_ids": torch.randint(0, 120, (2, 12))}):  # two rows
        h200.CALLS.clear()
        call = {"input_ids": ids, "labels": ids, **extra}
        call["labels"] = call["input_ids"]
        model(**call).loss.backward()
        assert h200.CALLS, extra


def test_the_batch_1_routing_is_off_with_the_sdpa_switch_and_off_sm_90(h200, ckpts, monkeypatch):
    monkeypatch.setenv("PANOVLM_FLASHPATCH_SDPA_FLASH_FIRST", "0")
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    assert panovlm_flashpatch.report(model)[0]["by_phase"]["unpadded training"]["backend"] == FA2
    monkeypatch.delenv("PANOVLM_FLASHPATCH_SDPA_FLASH_FIRST")
    ampere = probe_module.DeviceInfo(index=0, name="Fake A100", compute_capability=(8, 0), bf16=True)
    monkeypatch.setattr(probe_module, "probe", lambda devices=None: caps(devices=(ampere,)))
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    phase = panovlm_flashpatch.report(model)[0]["by_phase"]["unpadded training"]
    assert phase["backend"] == FA2 and "sm_90 only" in phase["why"]
    ids = torch.randint(0, 120, (1, 12))
    h200.CALLS.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    assert h200.CALLS.get("flash_attn_func")


# --- SDPA: flash kernel before cuDNN for a new shape ----------------------------------------------------------


@pytest.fixture
def no_flash_attn(monkeypatch, patched):
    """A CUDA GPU (sm_90) without flash-attn: the language model stays on SDPA."""
    monkeypatch.setattr(probe_module, "probe", lambda devices=None: caps(flash_attn_error="flash-attn is not installed",
                                                                         flash_attn_version=None))


def _cudnn_seen(model, calls, monkeypatch):
    """Whether cuDNN's SDPA kernel was enabled at each SDPA call of each ``calls`` item."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = []
    for call in calls:
        seen.clear()
        call()
        out.append(set(seen))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", original)
    return out


def test_sdpa_training_forwards_of_a_new_shape_skip_cudnn(no_flash_attn, ckpts, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"]).train()
    by_phase = panovlm_flashpatch.report(model)[0]["by_phase"]
    # Padded batches run packed on torch's varlen kernel (runtime/varlen.py, transformers >= 4.53); unpadded ones,
    # and padded ones before 4.53, on SDPA, flash first.
    packs = padding_free.passes_varlen_kwargs()
    assert by_phase["padded training"]["backend"] == (backends.SDPA_VARLEN if packs else backends.SDPA_FLASH_FIRST)
    assert by_phase["unpadded training"]["backend"] == backends.SDPA_FLASH_FIRST
    a, b = torch.randint(0, 120, (2, 8)), torch.randint(0, 120, (2, 9))
    step = lambda ids: (lambda: model(input_ids=ids, labels=ids).loss.backward())  # noqa: E731

    def evaluate():
        with torch.no_grad():
            model(input_ids=a)

    seen = _cudnn_seen(model, [step(a), step(b), step(b), step(b), step(b), step(a), evaluate], monkeypatch)
    # new, new, a repeat or two (a varying-length run repeats a shape now and then: no plan build for it), the 4th
    # in a row (a fixed shape: cuDNN's plan), new again, no gradients
    assert seen == [{False}, {False}, {False}, {False}, {True}, {False}, {True}]
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(ValueError):  # a forward that raises inside the window: cuDNN's kernel is back on
        model(input_ids=torch.randint(0, 120, (2, 5)), labels=torch.zeros(3, 7, dtype=torch.long))
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_the_sdpa_order_leaves_the_users_settings_and_other_models_alone(no_flash_attn, ckpts, monkeypatch):
    ids = torch.randint(0, 120, (2, 8))
    other = _plain(ckpts["lm"]).train()
    mine = AutoModelForCausalLM.from_pretrained(ckpts["lm"]).train()
    explicit = AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="eager").train()
    seen = _cudnn_seen(other, [lambda: other(input_ids=ids, labels=ids), lambda: explicit(input_ids=ids, labels=ids)],
                       monkeypatch)
    assert seen[0] == {True}
    torch.backends.cuda.enable_cudnn_sdp(False)  # the user's own setting
    try:
        mine(input_ids=ids, labels=ids).loss.backward()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    monkeypatch.setenv("PANOVLM_FLASHPATCH_SDPA_FLASH_FIRST", "0")
    off = AutoModelForCausalLM.from_pretrained(ckpts["lm"]).train()
    assert _cudnn_seen(off, [lambda: off(input_ids=ids, labels=ids)], monkeypatch) == [{True}]
    why = panovlm_flashpatch.report(off)[0]["by_phase"]["unpadded training"]["rejected"][backends.SDPA_FLASH_FIRST]
    assert "PANOVLM_FLASHPATCH_SDPA_FLASH_FIRST=0" in why


# --- the report, the log line, the doctor -----------------------------------------------------------------------


def test_every_phase_has_a_backend_and_every_rejection_a_reason(emulated, ckpts, caplog):
    with caplog.at_level(logging.INFO, logger="panovlm_flashpatch"):
        model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16)
    phases = panovlm_flashpatch.report(model)[0]["by_phase"]
    assert set(phases) == {"padded training", "unpadded training", "decoding", "float32 outside autocast"}
    assert phases["decoding"]["backend"] == "sdpa" and phases["float32 outside autocast"]["backend"] == "sdpa"
    for choice in phases.values():
        assert choice["why"] and all(isinstance(r, str) and r for r in choice["rejected"].values())
    assert "flash-attn-3 is not installed" in phases["padded training"]["rejected"][backends.FA3]
    assert any("per phase: padded training → flash_attention_2 + packing" in r.getMessage() for r in caplog.records)


def test_an_encoder_reports_its_encoder_phase(no_flash_attn, ckpts):
    model = transformers.AutoModel.from_pretrained(ckpts["siglip_vision"])
    phases = panovlm_flashpatch.report(model)[0]["by_phase"]
    assert set(phases) == {"encoder", "float32 outside autocast"}
    assert phases["encoder"]["backend"] == backends.SDPA_FLASH_FIRST  # no flash-attn; a (fake) sm_90 GPU
    assert "flash-attn is not installed" in phases["encoder"]["rejected"][FA2]


def test_the_doctor_lists_every_backend(no_flash_attn):
    from panovlm_flashpatch import doctor

    info = doctor.collect()
    for name in (backends.FA2, backends.FA3, backends.FA4, "sdpa_flash_first", "sdpa", "eager"):
        assert f"backend.{name}" in info
    assert "not installed" in info[f"backend.{backends.FA3}"]


# --- fused kernels someone else put in (liger-kernel) ---------------------------------------------------------


def _liger_like(tmp_path, monkeypatch):
    """A package named like liger-kernel whose RMSNorm class and forward are what liger swaps in (the CPU has no
    triton, so liger itself cannot be imported here; tests/gpu covers the real one)."""
    pkg = tmp_path / "liger_kernel" / "transformers"
    pkg.mkdir(parents=True)
    (tmp_path / "liger_kernel" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(
        "import torch\n"
        "class LigerRMSNorm(torch.nn.Module):\n"
        "    def __init__(self, inner):\n"
        "        super().__init__(); self.inner = inner\n"
        "    def forward(self, x):\n"
        "        return self.inner(x)\n"
        "def lce_forward(self, *args, **kwargs):\n"
        "    return type(self).__mro__[1].forward(self, *args, **kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("liger_kernel.transformers")


def test_fused_kernels_are_reported_and_a_forward_replaced_after_the_load_is_named(patched, ckpts, tmp_path,
                                                                                     monkeypatch):
    liger = _liger_like(tmp_path, monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert panovlm_flashpatch.report(model)[0]["fused_kernels"] is None
    model.model.norm = liger.LigerRMSNorm(model.model.norm)
    assert panovlm_flashpatch.report(model)[0]["fused_kernels"] == "liger_kernel: LigerRMSNorm x1"
    # liger's apply_liger_kernel_to_* replaces the class forward; after the load it replaces the plugin's wrapper too
    subclass = type("Patched" + type(model).__name__, (type(model),), {"forward": liger.lce_forward})
    model.__class__ = subclass
    found = panovlm_flashpatch.report(model)[0]["fused_kernels"]
    assert "forward: lce_forward (replaced the plugin's per-forward wrapper" in found


# --- found by the adversarial review (docs/faults.md 105-110) ---------------------------------------------------


def test_gradient_checkpointing_keeps_torchs_order_and_batch_1_on_flashattention2(no_flash_attn, ckpts, monkeypatch):
    # The recompute runs in the backward, outside the forward's window: it must pick the kernel the forward picked.
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"]).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 120, (2, 8))
    assert _cudnn_seen(model, [lambda: model(input_ids=ids, labels=ids).loss.backward()], monkeypatch) == [{True}]


def test_batch_1_with_gradient_checkpointing_stays_on_flashattention2(h200, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 120, (1, 12))
    h200.CALLS.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    assert h200.CALLS.get("flash_attn_func")


def test_the_callers_own_cudnn_only_kernel_choice_is_kept(no_flash_attn, ckpts, monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"]).train()
    ids = torch.randint(0, 120, (2, 8))
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]):
        model(input_ids=ids, labels=ids)
    assert set(seen) == {(True, True)}  # cuDNN as the caller chose it (it was switched off before the fix)


@pytest.mark.skipif(TV < (4, 54), reason="set_attn_implementation exists from 4.54")
def test_a_backend_the_user_sets_turns_the_sdpa_order_off(no_flash_attn, ckpts, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"]).train()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 120, (2, 8))
    assert _cudnn_seen(model, [lambda: model(input_ids=ids, labels=ids)], monkeypatch) == [{True}]


def test_a_positional_batch_1_call_is_routed_like_a_keyword_one(h200, ckpts, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], dtype=torch.bfloat16).train()
    ids = torch.randint(0, 120, (1, 12))
    h200.CALLS.clear()
    seen = _cudnn_seen(model, [lambda: model(ids, torch.ones_like(ids), labels=ids).loss.backward()], monkeypatch)
    assert not h200.CALLS and seen == [{False}]  # SDPA, and with the flash kernel first (cuDNN on before the fix)


def test_batch_1_stays_on_flashattention2_where_sdpa_would_compute_otherwise(h200, tmp_path):
    if not tiny.has_family("gemma2"):
        pytest.skip("no gemma2 here")
    path = tiny.build_causal_lm(str(tmp_path / "gemma2"), "gemma2")  # attention soft-capping: FA2 applies it
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").train()
    assert "batch-1 training" not in panovlm_flashpatch.report(model)[0]["phases"]
    ids = torch.randint(0, 120, (1, 12))
    h200.CALLS.clear()
    model(input_ids=ids, labels=ids).loss.backward()  # raised "sdpa attention does not support softcap" on 5.x
    assert h200.CALLS


def test_rope_types_are_read_per_layer_type():
    import types

    config = types.SimpleNamespace(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0},
                                                    "sliding_attention": {"rope_type": "default"}})
    assert padding_free._rope_type(config) == "dynamic"
    assert padding_free._rope_type(types.SimpleNamespace(rope_parameters={"rope_type": "linear"})) == "linear"
    assert padding_free._rope_type(types.SimpleNamespace(rope_parameters={"rope_type": "default"})) is None


def test_liger_set_on_the_instance_is_reported(patched, ckpts, tmp_path, monkeypatch):
    import types

    liger = _liger_like(tmp_path, monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    model.forward = types.MethodType(liger.lce_forward, model)  # what Trainer(use_liger_kernel=True) does
    assert "set on the model itself" in panovlm_flashpatch.report(model)[0]["fused_kernels"]


def test_apply_keeps_one_and_zero_as_booleans(patched):
    from panovlm_flashpatch import settings

    panovlm_flashpatch.apply(padding_free=1, sdpa_flash_first=0)
    assert settings.current().padding_free is True and settings.current().sdpa_flash_first is False


def test_a_llava_is_packed_by_default_only_when_its_language_model_will_run_flashattention2(h200, ckpts):
    from test_padding_free_families import llava_batch

    model = transformers.LlavaForConditionalGeneration.from_pretrained(ckpts["llava_siglip"], dtype=torch.bfloat16).train()
    seen = []
    model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    batch = llava_batch("right")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    ids = batch["input_ids"][:1, :9]
    model(input_ids=ids, labels=ids).loss.backward()  # batch 1: the language model switches to SDPA
    model(**batch).loss.backward()  # then a padded batch: FA2 again, so packed (it read SDPA before the fix)
    assert seen == [1, 1]
    model.float()  # float32 outside autocast: the language model will run SDPA, and by default that stays padded
    batch["pixel_values"] = batch["pixel_values"].float()
    seen.clear()
    model(**batch).loss.backward()
    assert seen == [4]
