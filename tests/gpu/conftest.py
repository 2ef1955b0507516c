"""Shared by the GPU modules: the skip condition and fixtures that count real kernel calls."""

from __future__ import annotations

import pytest
import torch

import panovlm_flashpatch
from panovlm_flashpatch import _safety
from panovlm_flashpatch import probe as probe_module


def skip_without_fa2() -> None:
    """Skips the calling module (not fails) without a CUDA GPU of sm >= 8.0 and a working flash-attn,
    so CI, which has no GPU, stays green. Run on the GPU machine with ``python -m pytest -m gpu``."""
    caps = probe_module.probe() if torch.cuda.is_available() else None
    if caps is None or caps.fa2_blockers():
        pytest.skip(f"needs a CUDA GPU (sm >= 8.0) with a working flash-attn: {caps.fa2_blockers() if caps else 'no CUDA'}",
                    allow_module_level=True)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into flash-attn's compiled forward kernels (not what a config says)."""
    import flash_attn_2_cuda

    calls = []
    for name in ("fwd", "varlen_fwd"):
        real = getattr(flash_attn_2_cuda, name)
        monkeypatch.setattr(flash_attn_2_cuda, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@pytest.fixture
def applied():

    panovlm_flashpatch.remove()
    panovlm_flashpatch.clear_report()
    _safety.internal_errors.clear()
    assert panovlm_flashpatch.apply()
    yield
    panovlm_flashpatch.remove()
    assert _safety.internal_errors == []
