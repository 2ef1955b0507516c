"""Shared fixtures: tiny real checkpoints on disk, the patch on/off, and the one faked seam (the probe).

Only the capability probe is ever faked (this machine has no GPU and no flash-attn); every load
goes through the real transformers ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import panovlm_flashpatch
from panovlm_flashpatch import probe as probe_module
from panovlm_flashpatch import settings as settings_module
from panovlm_flashpatch import tiny
from panovlm_flashpatch.compat import parse_version, transformers_facts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TV = parse_version(transformers_facts().version)
FAKE_GPU = probe_module.DeviceInfo(index=0, name="Fake H100", compute_capability=(9, 0), bf16=True)


def caps(**overrides) -> probe_module.Capabilities:
    """Capabilities of a machine that can run FlashAttention-2, with ``overrides`` applied."""
    base = probe_module.Capabilities(
        torch_version=torch.__version__,
        cuda_available=True,
        devices=(FAKE_GPU,),
        flash_attn_version="2.8.3",
        flash_attn_error=None,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Every tiny checkpoint, saved once per session."""
    root = tmp_path_factory.mktemp("ckpts")
    paths = {
        "lm": tiny.build_lm(str(root / "lm")),
        "siglip_vision": tiny.build_siglip_vision(str(root / "siglip_vision")),
        "siglip": tiny.build_siglip(str(root / "siglip")),
        "clip_vision": tiny.build_clip_vision(str(root / "clip_vision")),
        "dinov2": tiny.build_dinov2(str(root / "dinov2")),
        "llava_siglip": tiny.build_llava(str(root / "llava_siglip"), vision="siglip"),
        "remote": tiny.build_remote_code(str(root / "remote")),
    }
    if tiny.has_siglip2():
        paths["siglip2_vision"] = tiny.build_siglip2_vision(str(root / "siglip2_vision"))
        paths["siglip2"] = tiny.build_siglip2(str(root / "siglip2"))
        paths["llava_siglip2"] = tiny.build_llava(str(root / "llava_siglip2"), vision="siglip2")
    return paths


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    """Every test starts unpatched, with an empty report and none of our variables set."""
    for name in settings_module.known_variables():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    panovlm_flashpatch.remove()
    panovlm_flashpatch.clear_report()
    from panovlm_flashpatch import reporting

    reporting.forget_once()  # "logged once" is per process; each test checks its own messages
    default_dtype = torch.get_default_dtype()
    from panovlm_flashpatch import _safety

    _safety.internal_errors.clear()
    yield
    panovlm_flashpatch.remove()
    panovlm_flashpatch.clear_report()
    assert torch.get_default_dtype() == default_dtype, "a load leaked torch's default dtype"
    assert _safety.internal_errors == [], "the plugin's safety net absorbed its own error"


@pytest.fixture
def patched():
    assert panovlm_flashpatch.apply()
    yield
    panovlm_flashpatch.remove()


@pytest.fixture
def capable(monkeypatch, patched):
    """The patch applied and the probe faked to report a usable flash-attn on an sm_90 GPU.

    flash-attn is really absent here, so transformers itself refuses every FlashAttention-2 load:
    the retry path runs for real.
    """
    monkeypatch.setattr(probe_module, "probe", lambda devices=None: caps())
    return caps()


def outcome(load):
    """What a load gave, comparable across runs: the error's type and message, or the model's
    per-component attention backends."""
    from panovlm_flashpatch.observe import observe
    from panovlm_flashpatch.components import sub_config_keys

    try:
        result = load()
    except Exception as exc:  # noqa: BLE001 - the point is to compare any error
        return ("error", type(exc), str(exc))
    model = result[0] if isinstance(result, tuple) else result
    seen = observe(model, sub_config_keys(model.config))
    return ("ok", {k: (v.backend, v.dtype) for k, v in seen.items()})


def without_plugin(load):
    """Runs ``load`` with the patch removed, then puts it back if it was applied."""
    was = panovlm_flashpatch.is_applied()
    panovlm_flashpatch.remove()
    try:
        return outcome(load)
    finally:
        if was:
            panovlm_flashpatch.apply()


@pytest.fixture
def emulated(monkeypatch, patched):
    """The patch applied, the probe faked capable, and FlashAttention-2 really running on the CPU
    through tests/emulated_flash_attn (transformers >= 4.54; skips before). Returns the stand-in kernel
    module: ``emulated.CALLS`` counts its calls."""
    import emulation

    kernel = emulation.activate(monkeypatch, caps)
    yield kernel
    emulation.deactivate()
