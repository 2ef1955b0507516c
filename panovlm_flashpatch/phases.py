"""Per-phase backends: ``generate()`` on SDPA for models the plugin put on FlashAttention-2.

Why: measured on an H100 (transformers 5.17, flash-attn 2.8.3), batched greedy decoding is slower on
FlashAttention-2 than on SDPA (benchmarks/results). transformers' FA2 path re-derives the padding
indices in every layer of every decode step (``nonzero`` plus host syncs: 28 ``nonzero`` calls and
~58 stream syncs per step for a 28-layer model, benchmarks/profile_generate.py), and decoding is bound by
that per-step overhead. Training and prefill-heavy work keep FlashAttention-2.

How: ``GenerationMixin.generate`` is wrapped once; for a model registered here (only models whose load
ended on FlashAttention-2, on transformers >= 4.54 where ``set_attn_implementation`` switches in place),
the wrapper switches every FA2 component to SDPA, runs generate, and switches back, even on error.
``PANOVLM_FLASHPATCH_GENERATE_FA2=1`` keeps FlashAttention-2 in generate. Concurrent forwards on the same
model from another thread during generate() would see SDPA: generate and train in turns, as usual.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref

from . import reporting
from ._wrapping import unwrap, wrap_once
from . import settings as settings_module

FA2 = "flash_attention_2"
_MARKER = "_self_panovlm_flashpatch_generate"

_lock = threading.RLock()
_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_installed = {"original": None, "wrapper": None}


@dataclasses.dataclass(frozen=True)
class SwitchPlan:
    """The ``set_attn_implementation`` arguments for generate() and for afterwards."""

    during: object
    after: object


def plan_for(backends: dict[str, str], composite: bool) -> SwitchPlan | None:
    """From the observed backend per component key, the switch (None when nothing runs FA2)."""
    if not any(b == FA2 for b in backends.values()):
        return None
    if not composite:
        return SwitchPlan(during="sdpa", after=FA2)
    during = {k: ("sdpa" if b == FA2 else b) for k, b in backends.items()}
    return SwitchPlan(during=during, after=dict(backends))


def arm(model, plan: SwitchPlan | None) -> bool:
    """Registers ``model`` for the generate() switch. False where it cannot switch in place."""
    if plan is None or not hasattr(model, "set_attn_implementation") or not hasattr(model, "generate"):
        return False
    with _lock:
        try:
            _plans[model] = plan
        except TypeError:
            return False
    return True


def is_armed(model) -> bool:
    with _lock:
        return model in _plans


def _generate_wrapper(wrapped, instance, args, kwargs):
    with _lock:
        plan = _plans.get(instance) if instance is not None else None
    if plan is None:
        return wrapped(*args, **kwargs)
    keep, problem = settings_module.parse_flag(settings_module.GENERATE_FA2)
    if problem:
        reporting.log_once(problem, logging.WARNING, problem)
    if keep:
        return wrapped(*args, **kwargs)
    try:
        instance.set_attn_implementation(plan.during)
    except Exception as exc:  # e.g. a component without SDPA: generate on FlashAttention-2 as loaded
        reporting.log_once(f"generate-switch:{type(instance).__name__}", logging.WARNING,
                           f"could not switch {type(instance).__name__} to SDPA for generate() ({type(exc).__name__}: {exc}); "
                           "it generates on FlashAttention-2")
        _restore(instance, plan)
        return wrapped(*args, **kwargs)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _restore(instance, plan)


def _restore(model, plan: SwitchPlan) -> None:
    try:
        model.set_attn_implementation(plan.after)
    except Exception as exc:
        reporting.log_once(f"generate-restore:{type(model).__name__}", logging.WARNING,
                           f"could not switch {type(model).__name__} back to FlashAttention-2 after generate() "
                           f"({type(exc).__name__}: {exc}); it stays on SDPA")


def install() -> None:
    from transformers.generation.utils import GenerationMixin

    with _lock:
        done = wrap_once(GenerationMixin, "generate", _generate_wrapper, _MARKER)
        if done is not None:
            _installed["original"], _installed["wrapper"] = done


def uninstall() -> None:
    import sys

    if "transformers.generation.utils" not in sys.modules:
        return
    from transformers.generation.utils import GenerationMixin

    with _lock:
        if _installed["wrapper"] is not None and unwrap(GenerationMixin, "generate", _installed["original"], _installed["wrapper"]):
            _installed["wrapper"] = _installed["original"] = None
