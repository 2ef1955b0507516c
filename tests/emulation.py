"""FlashAttention-2 on the CPU, for tests: transformers' real FA2 path with a stand-in kernel.

This machine cannot have a GPU or flash-attn's CUDA extension, so two things are faked, and only
these: the plugin's capability probe (conftest.caps) and the kernel (tests/emulated_flash_attn, a
flash-attn 2.8 look-alike that computes attention with torch ops and refuses float32 inputs exactly
as the CUDA kernel does). transformers' own availability checks are told that flash-attn is usable;
everything else (the load, the mask building, transformers' FA2 integration, unpadding) runs for real.

transformers loads a model onto FlashAttention-2 on the CPU only from 4.54 (earlier versions refuse a
model that is not on a GPU at load, and import the kernel when their model modules are imported), so
the fixture skips on older versions.
"""

from __future__ import annotations

import os
import sys

import pytest

from panovlm_flashpatch import probe as probe_module
from panovlm_flashpatch.compat import parse_version, transformers_facts

EMULATED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulated_flash_attn")
_STAND_IN_MODULES = ("flash_attn", "flash_attn.bert_padding", "flash_attn_2_cuda")
# transformers.modeling_flash_attention_utils caches the imported kernel functions in these globals.
_LAZY_GLOBALS = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")


def supported() -> bool:
    return parse_version(transformers_facts().version)[:2] >= (4, 54)


def _true(*args, **kwargs):
    return True


def activate(monkeypatch, caps):
    """Makes FlashAttention-2 loadable and runnable on this CPU until the test ends; returns the kernel module."""
    if not supported():
        pytest.skip("transformers loads FlashAttention-2 on a CPU model only from 4.54")
    import importlib

    monkeypatch.syspath_prepend(EMULATED)
    for name in _STAND_IN_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    kernel = importlib.import_module("flash_attn")
    import transformers.modeling_flash_attention_utils as mfau

    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers") or module is None:
            continue
        for attr in ("is_flash_attn_2_available", "is_flash_attn_greater_or_equal_2_10"):
            if callable(vars(module).get(attr)):
                monkeypatch.setattr(module, attr, _true)
    matrix = getattr(mfau, "FLASH_ATTENTION_COMPATIBILITY_MATRIX", None)
    if matrix is not None:  # 5.x holds the availability checks as function references
        monkeypatch.setitem(matrix, 2, {**matrix[2], "general_availability_check": _true, "pkg_availability_check": _true})
    for attr in _LAZY_GLOBALS:
        if hasattr(mfau, attr):
            monkeypatch.setattr(mfau, attr, None)
    monkeypatch.setattr(probe_module, "probe", lambda devices=None: caps())
    from panovlm_flashpatch.runtime import dispatch

    # The stand-in kernel runs on the CPU: for the per-forward switch, the CPU is a FlashAttention-2 device.
    monkeypatch.setattr(dispatch, "FA2_DEVICES", ("cuda", "cpu"))
    return kernel


def deactivate() -> None:
    """Forgets the stand-in: later tests must see this machine as it is (no flash-attn)."""
    for name in _STAND_IN_MODULES:
        sys.modules.pop(name, None)
    probe_module.cache_clear()
