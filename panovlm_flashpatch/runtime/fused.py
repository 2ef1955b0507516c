"""Fused kernels someone else put in the model (liger-kernel, transformers' ``use_kernels=True``): found and reported.

The plugin patches no kernel of its own into a model, so nothing is ever patched twice; what it must know is
whether a fused kernel replaced code its features rely on. liger-kernel's ``apply_liger_kernel_to_*`` swaps
RMSNorm, SwiGLU and rotary modules inside the model and replaces the causal LM class's ``forward`` with its
fused linear cross-entropy forward (no logits in a training output that has labels). Applied before the load,
the plugin's per-forward wrapper wraps liger's forward and padding-free packs around it (equal to the padded run,
tests/gpu). Applied to the class after the load, liger's forward replaces the plugin's wrapper: the next load of
that class wraps it again, and until then the report says so.
"""

from __future__ import annotations

import collections

_PACKAGES = ("liger_kernel", "kernels")


def _origin(obj) -> str | None:
    module = getattr(obj, "__module__", "") or ""
    return module.split(".")[0] if module.split(".")[0] in _PACKAGES else None


def describe(model) -> str | None:
    """``"liger_kernel: LigerRMSNorm x57, LigerSwiGLUMLP x28; forward: lce_forward"`` (None: none found)."""
    from .forward import _MARKER, defining_class

    found = collections.Counter()
    origin = None
    for module in model.modules():
        where = _origin(type(module))
        if where:
            found[type(module).__name__] += 1
            origin = origin or where
    parts = [", ".join(f"{name} x{count}" for name, count in found.most_common())] if found else []
    own = model.__dict__.get("forward")  # Trainer(use_liger_kernel=True): liger sets model.forward on the instance
    own_inner = getattr(own, "__func__", own)
    if own is not None and _origin(own_inner):
        origin = origin or _origin(own_inner)
        parts.append(f"forward: {getattr(own_inner, '__name__', 'fused')} set on the model itself (padding-free and the "
                     "per-forward switch of the model's own forward do not run)")
    try:
        entry = vars(defining_class(type(model)))["forward"]
    except (TypeError, KeyError):
        entry = None
    inner = getattr(entry, "__wrapped__", entry)
    if entry is not None and _origin(inner):
        origin = origin or _origin(inner)
        wrapped = bool(getattr(entry, _MARKER, False))
        parts.append(f"forward: {getattr(inner, '__name__', 'fused')}"
                     + ("" if wrapped else " (replaced the plugin's per-forward wrapper after the load: padding-free "
                                          "and the per-forward switch do not run until the next load of this class)"))
    return f"{origin}: {'; '.join(parts)}" if parts else None
