"""Installs and removes the wrapper around ``PreTrainedModel.from_pretrained``; runs each call.

The wrapper is installed once, behind a marker (wrapping twice would run it twice per load), and
``remove()`` puts the class ``__dict__`` entry back exactly. The per-call gate re-reads the
settings, so ``DISABLE_FLASH_ATTN`` works after the patch is in place.
"""

from __future__ import annotations

import logging
import threading
import time

from . import padding_free as padding_free_module
from . import phases
from . import ranks
from . import reporting as report_module
from . import settings as settings_module
from .compat import transformers_facts
from .load import load_with_fallback
from .observe import observe
from .plan import CannotPlan, Plan, checkpoint_of, plan_call

_MARKER = "_self_panovlm_flashpatch"


class _PatchState:
    """Instance attributes on purpose: the original ``classmethod`` and our wrapper are
    descriptors, and stored as class attributes they would be bound on every read."""

    def __init__(self):
        self.lock = threading.RLock()
        self.original = None  # PreTrainedModel.__dict__["from_pretrained"] before apply()
        self.installed = None  # the wrapt FunctionWrapper we put there
        self.active = True  # False once something wrapped on top of us and remove() could not unwind
        self.keep_explicit_sdpa: bool | None = None
        self.padding_free: bool | str | None = None


_State = _PatchState()

#: Our own failures that the safety nets absorbed (the load went on untouched); tests assert none.
#: Bounded: a recurring bug in a long-running server must not grow it forever.
internal_errors: list[str] = []
_MAX_INTERNAL_ERRORS = 100


def _absorbed(message: str) -> None:
    internal_errors.append(message)
    del internal_errors[:-_MAX_INTERNAL_ERRORS]


def _pretrained_model_class():
    from transformers import modeling_utils

    return modeling_utils.PreTrainedModel


def is_applied() -> bool:
    """True when the wrapper sits on ``PreTrainedModel.from_pretrained`` (ours or another copy's)."""
    import sys

    if "transformers" not in sys.modules:
        return False
    entry = _pretrained_model_class().__dict__.get("from_pretrained")
    return bool(getattr(entry, _MARKER, False)) and _State.active


def apply(keep_explicit_sdpa: bool | None = None, padding_free: bool | str | None = None) -> bool:
    """Wraps ``PreTrainedModel.from_pretrained``. Idempotent and thread-safe.

    Args:
        keep_explicit_sdpa: keep a caller's explicit ``attn_implementation="sdpa"`` instead of
            upgrading it; None reads ``PANOVLM_FLASHPATCH_KEEP_SDPA`` at every load.
        padding_free: True: causal LMs loaded from now on run padded training forwards packed
            (padding_free.py); ``"loss_only"``: the same, and a training output that has a loss
            carries no logits (saves re-padding them); None reads ``PANOVLM_FLASHPATCH_PADDING_FREE``
            at every load.

    Returns:
        True when the patch is in place, False when the plugin stands aside (an unsupported
        transformers version; the reason is logged).
    """
    import wrapt

    if padding_free not in (None, True, False, settings_module.LOSS_ONLY):
        raise ValueError(f"padding_free={padding_free!r}: use True, False, {settings_module.LOSS_ONLY!r} or None "
                         f"(None reads {settings_module.PADDING_FREE})")
    logger = report_module.get_logger()
    with _State.lock:
        _State.keep_explicit_sdpa = keep_explicit_sdpa
        _State.padding_free = padding_free
        facts = transformers_facts()
        if not facts.supported:
            report_module.log_once(
                "unsupported",
                logging.WARNING,
                f"transformers {facts.version} is outside the supported range (>= 4.46, < 6); "
                "panovlm_flashpatch stands aside and every load runs as plain transformers.",
            )
            return False
        cls = _pretrained_model_class()
        entry = cls.__dict__.get("from_pretrained")
        phases.install()
        ranks.install()
        if getattr(entry, _MARKER, False):
            _State.active = True
            return True
        _State.original = entry
        wrapt.wrap_function_wrapper(cls, "from_pretrained", _wrapper)
        installed = cls.__dict__["from_pretrained"]
        setattr(installed, _MARKER, True)
        _State.installed = installed
        _State.active = True
        logger.debug("wrapped %s.from_pretrained (transformers %s)", cls.__qualname__, facts.version)
        return True


def remove() -> bool:
    """Restores the original ``from_pretrained``, and cancels a pending automatic activation (one
    that would otherwise patch once transformers' modeling module is imported). Returns True if
    something was removed or cancelled."""
    import sys

    from ._bootstrap import cancel

    cancelled = cancel()
    if "transformers.modeling_utils" not in sys.modules:
        return cancelled
    with _State.lock:
        if _State.installed is None:
            return cancelled
        cls = _pretrained_model_class()
        phases.uninstall()
        padding_free_module.uninstall()
        ranks.uninstall()
        if cls.__dict__.get("from_pretrained") is _State.installed:
            setattr(cls, "from_pretrained", _State.original)
            _State.installed = _State.original = None
            return True
        # Another library wrapped on top of ours: unwinding would drop its wrapper too. Ours stays
        # in the chain but passes every call through.
        _State.active = False
        report_module.get_logger().warning(
            "PreTrainedModel.from_pretrained was wrapped again after panovlm_flashpatch; its wrapper stays "
            "in place but now passes every load through untouched."
        )
        return True


def auto_apply() -> bool:
    """What the start-up hook does once transformers' modeling module is imported.

    The same path as :func:`apply` (one code path for both, as OpenTelemetry's auto-instrumentation
    does), gated by the settings: ``DISABLE_FLASH_ATTN`` means no patch at all, and
    ``PANOVLM_FLASHPATCH_AUTO=0`` leaves activation to an explicit ``apply()``.
    """
    current = settings_module.read()  # also reports values it does not understand
    if current.disabled:
        report_module.log_once(
            "auto-disabled", logging.INFO, "DISABLE_FLASH_ATTN is set: automatic activation did not patch transformers."
        )
        return False
    if not current.auto:
        return False
    return apply()


def _settings():
    import dataclasses

    current = settings_module.read()
    if _State.keep_explicit_sdpa is not None:
        current = dataclasses.replace(current, keep_explicit_sdpa=_State.keep_explicit_sdpa)
    if _State.padding_free is not None:
        current = dataclasses.replace(current, padding_free=_State.padding_free)
    return current


def _wrapper(wrapped, instance, args, kwargs):
    """The per-call path: gate, plan, load with fallback, report."""
    if not _State.active:
        return wrapped(*args, **kwargs)
    current = _settings()
    if current.disabled:
        report_module.log_once(
            "disabled", logging.INFO, "DISABLE_FLASH_ATTN is set: every load passes through untouched."
        )
        return wrapped(*args, **kwargs)
    cls = instance if isinstance(instance, type) else type(instance)
    facts = transformers_facts()
    started = time.perf_counter()
    try:
        plan = plan_call(cls, args, kwargs, current, facts)
    except CannotPlan as exc:
        report_module.get_logger().log(
            report_module.info_level(), "%s  [%s]  → left to transformers  (%s)", cls.__name__, checkpoint_of(args, kwargs), exc
        )
        return wrapped(*args, **kwargs)
    except Exception as exc:  # a bug of ours must never cost the caller their load
        _absorbed(f"plan: {type(exc).__name__}: {exc}")
        report_module.log_once(
            f"plan-error:{type(exc).__name__}",
            logging.WARNING,
            f"could not plan the load of {cls.__name__} ({type(exc).__name__}: {exc}); passing it through untouched. "
            "Please report this.",
        )
        return wrapped(*args, **kwargs)
    planning = time.perf_counter() - started
    result, decision, attempts, seconds = load_with_fallback(
        wrapped, args, kwargs, plan.decision, facts.dtype_kwarg, plan.caller_attn
    )
    try:
        _publish(plan, decision, attempts, seconds, result, planning, packing=current.padding_free)
    except Exception as exc:  # reporting must never cost the caller their model
        _absorbed(f"report: {type(exc).__name__}: {exc}")
        report_module.log_once(
            f"report-error:{type(exc).__name__}", logging.WARNING, f"could not report a load ({type(exc).__name__}: {exc})"
        )
    return result


def _jsonable(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _arm_padding_free(model, packing):
    try:
        return padding_free_module.arm(model, loss_only=packing == settings_module.LOSS_ONLY)
    except Exception as exc:  # the model stays unpacked; the load and its report go on
        _absorbed(f"padding-free arm: {type(exc).__name__}: {exc}")
        return padding_free_module.Status(False, f"could not be armed ({type(exc).__name__}: {exc}); please report this")


def _publish(plan: Plan, decision, attempts, seconds, result, planning: float = 0.0, packing: bool | str = False) -> None:
    started = time.perf_counter()
    model = result[0] if isinstance(result, tuple) else result
    keys = tuple(c.component.key for c in decision.choices if c.component.key)
    try:
        seen = observe(model, keys)
    except Exception as exc:  # the record says "unknown" rather than losing the load
        _absorbed(f"observe: {type(exc).__name__}: {exc}")
        seen = {}
    first = {c.component.key: c for c in plan.decision.choices}
    switch = phases.plan_for({k: v.backend for k, v in seen.items()}, composite=bool(keys))
    armed = phases.arm(model, switch)
    packing_status = _arm_padding_free(model, packing) if packing else None
    # Time spent in the plugin's own code for this load (not in transformers): planning + observing.
    overhead_ms = round((planning + time.perf_counter() - started) * 1000, 3)
    records = []
    for choice in decision.choices:
        obs = seen.get(choice.component.key)
        # Retried: we asked for FlashAttention-2 for this component and transformers refused it.
        retried = first[choice.component.key].upgraded and not choice.upgraded
        reason = choice.reason
        if choice.upgraded and decision.dtype_note:
            reason = f"{reason}; {decision.dtype_note}"
        on_fa2 = bool(obs) and obs.backend == phases.FA2
        if on_fa2 and armed:
            reason = f"{reason}; generate() runs on sdpa (faster for decoding)"
        if packing_status is not None:
            reason = f"{reason}; {packing_status.describe()}"
        records.append(
            {
                "checkpoint": plan.checkpoint,
                "loaded_class": plan.model_class,
                "component": choice.component.key,
                "role": choice.component.role,
                "class": obs.model_class if obs else choice.component.model_class,
                "requested": _jsonable(choice.requested),
                "decision": _jsonable(choice.backend) if choice.backend is not None else "transformers default",
                "backend": obs.backend if obs else "unknown",
                "dtype": obs.dtype if obs else None,
                "reason": reason,
                "retried": retried,
                "rejected": {k: v for k, v in choice.rejected.items()},
                "attempts": [_jsonable(a.to_dict()) for a in attempts],
                "phases": {"generate": "sdpa"} if on_fa2 and armed else {},
                "padding_free": packing_status.describe() if packing_status else None,
                "seconds": round(seconds, 4),
                "overhead_ms": overhead_ms,
            }
        )
    report_module.publish(records, model=model)
    try:
        ranks.after_load(records)
    except Exception as exc:  # the cross-rank check must never cost the caller their model
        _absorbed(f"ranks: {type(exc).__name__}: {exc}")
        report_module.log_once(f"ranks-error:{type(exc).__name__}", logging.WARNING,
                               f"could not compare this load across ranks ({type(exc).__name__}: {exc})")
