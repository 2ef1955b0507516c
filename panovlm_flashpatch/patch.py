"""Installs and removes the wrapper around ``PreTrainedModel.from_pretrained``; runs each call.

The wrapper is installed once, behind a marker (wrapping twice would run it twice per load), and
``remove()`` puts the class ``__dict__`` entry back exactly. The per-call gate re-reads the settings,
so ``DISABLE_FLASH_ATTN`` works after the patch is in place. Per call: plan (plan.py) -> load with
fallback (load.py) -> observe what the model runs (observe.py) -> arm the runtime features
(runtime/) -> records and log lines (record.py) -> compare across ranks (runtime/ranks.py).

``remove()`` starts a new epoch (state.py) under the same lock that arming takes: a load that was in
flight when it ran returns its model unarmed and leaves no class wrapped, and models armed before it are
inert from then on.
"""

from __future__ import annotations

import logging
import threading
import time

from . import _safety, record, reporting, runtime, settings, state
from .compat import transformers_facts
from .load import load_with_fallback
from .observe import observe
from .plan import CannotPlan, Plan, checkpoint_of, plan_call
from .runtime import ranks

_MARKER = "_self_panovlm_flashpatch"


class _PatchState:
    """Instance attributes on purpose: the original ``classmethod`` and our wrapper are
    descriptors, and stored as class attributes they would be bound on every read."""

    def __init__(self):
        self.lock = threading.RLock()
        self.original = None  # PreTrainedModel.__dict__["from_pretrained"] before apply()
        self.installed = None  # the wrapt FunctionWrapper we put there
        self.active = True  # False once something wrapped on top of us and remove() could not unwind


_State = _PatchState()

#: Kept for callers of the 0.1 API (the ledger lives in _safety.py).
internal_errors = _safety.internal_errors


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


def apply(**options) -> bool:
    """Wraps ``PreTrainedModel.from_pretrained`` (once; thread-safe) and keeps the options given.

    Options (each None by default, which keeps its current value; unset, the environment decides):
    ``keep_explicit_sdpa``, ``encoders_fa2``, ``generate_fa2``, ``fast_generate``, ``sdpa_flash_first`` (booleans)
    and ``padding_free`` (``"auto"``, True, False or ``"loss_only"``). They apply to every load from then on; ``remove()`` forgets them.

    Returns:
        True when the patch is in place, False when the plugin stands aside (an unsupported
        transformers version; the reason is logged).
    """
    settings.set_overrides(**options)  # validates first: a bad value changes nothing
    try:
        from . import flash_attn_guard

        flash_attn_guard.hide_if_broken()
    except Exception as exc:
        _safety.absorb("flash-attn guard", exc, "transformers' view of flash-attn was left as it is")
    return _install()


def _install() -> bool:
    import wrapt

    with _State.lock:
        facts = transformers_facts()
        if not facts.supported:
            reporting.log_once(
                "unsupported",
                logging.WARNING,
                f"transformers {facts.version} is outside the supported range (>= 4.46, < 6); "
                "panovlm_flashpatch stands aside and every load runs as plain transformers.",
            )
            return False
        cls = _pretrained_model_class()
        entry = cls.__dict__.get("from_pretrained")
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
        reporting.get_logger().debug("wrapped %s.from_pretrained (transformers %s)", cls.__qualname__, facts.version)
        return True


def remove() -> bool:
    """Restores the original ``from_pretrained`` and every class attribute the runtime features wrapped,
    forgets ``apply()``'s options, and makes every armed model inert. Returns True if something was removed.
    (``panovlm_flashpatch.remove()`` also cancels a pending automatic activation.)"""
    import sys

    settings.clear_overrides()
    if "transformers.modeling_utils" not in sys.modules:
        return False
    with _State.lock:
        state.new_epoch()
        runtime.uninstall()
        ranks.uninstall()
        if _State.installed is None:
            return False
        cls = _pretrained_model_class()
        if cls.__dict__.get("from_pretrained") is _State.installed:
            setattr(cls, "from_pretrained", _State.original)
            _State.installed = _State.original = None
            return True
        # Another library wrapped on top of ours: unwinding would drop its wrapper too. Ours stays
        # in the chain but passes every call through.
        _State.active = False
        reporting.emit(logging.WARNING,
                       "PreTrainedModel.from_pretrained was wrapped again after panovlm_flashpatch; its wrapper stays "
                       "in place but now passes every load through untouched.")
        return True


def auto_apply() -> bool:
    """What the start-up hook does once transformers' modeling module is imported.

    The same installation as :func:`apply` (one code path for both, as OpenTelemetry's auto-instrumentation
    does), with no options: what the program passed to ``apply()`` earlier is kept. Gated by the settings:
    ``DISABLE_FLASH_ATTN`` means no patch at all, ``PANOVLM_FLASHPATCH_AUTO=0`` leaves activation to ``apply()``.
    """
    current = settings.current()  # also reports values it does not understand
    if current.disabled:
        reporting.log_once(
            "auto-disabled", logging.INFO, "DISABLE_FLASH_ATTN is set: automatic activation did not patch transformers."
        )
        return False
    if not current.auto:
        return False
    return _install()


def _wrapper(wrapped, instance, args, kwargs):
    """The per-call path: gate, plan, load with fallback, report."""
    if not _State.active:
        return wrapped(*args, **kwargs)
    current = settings.current()
    if current.disabled:
        reporting.log_once(
            "disabled", logging.INFO, "DISABLE_FLASH_ATTN is set: every load passes through untouched."
        )
        return wrapped(*args, **kwargs)
    epoch = state.EPOCH[0]
    cls = instance if isinstance(instance, type) else type(instance)
    facts = transformers_facts()
    started = time.perf_counter()
    try:
        plan = plan_call(cls, args, kwargs, current, facts)
    except CannotPlan as exc:
        reporting.emit(reporting.info_level(), f"{cls.__name__}  [{checkpoint_of(args, kwargs)}]  → left to transformers  ({exc})")
        return wrapped(*args, **kwargs)
    except Exception as exc:  # a bug of ours must never cost the caller their load
        _safety.absorb(f"planning the load of {cls.__name__}", exc, "the load passed through untouched")
        return wrapped(*args, **kwargs)
    planning = time.perf_counter() - started
    result, decision, attempts, seconds = load_with_fallback(
        wrapped, args, kwargs, plan.decision, facts.dtype_kwarg, plan.caller_attn
    )
    try:
        _publish(plan, decision, attempts, seconds, result, planning, current, epoch)
    except Exception as exc:  # reporting must never cost the caller their model
        _safety.absorb("reporting a load", exc, "the model was returned without its report")
    return result


def _publish(plan: Plan, decision, attempts, seconds, result, planning: float, current, epoch: int) -> None:
    started = time.perf_counter()
    model = result[0] if isinstance(result, tuple) else result
    keys = tuple(c.component.key for c in decision.choices if c.component.key)
    try:
        seen = observe(model, keys)
    except Exception as exc:  # the record says "unknown" rather than losing the load
        _safety.absorb("observing a load", exc, "its report says 'unknown'")
        seen = {}
    load = runtime.Load(checkpoint=plan.checkpoint, keys=keys, decision=decision, observed=seen, settings=current,
                        load_dtype=plan.request.load_dtype, caps=plan.caps)
    with _State.lock:
        # remove() while this load was in flight: the model is returned as transformers made it.
        effects = runtime.attach(model, load) if epoch == state.EPOCH[0] and _State.installed else {}
    first = {c.component.key: c for c in plan.decision.choices}
    # Time spent in the plugin's own code for this load (not in transformers): planning + observing + arming.
    overhead_ms = round((planning + time.perf_counter() - started) * 1000, 3)
    records = []
    for choice in decision.choices:
        key = choice.component.key
        obs = seen.get(key)
        mine = effects.get(key, []) + effects.get(None, [])
        # Retried: we asked for FlashAttention-2 for this component and transformers refused it.
        retried = first[key].upgraded and not choice.upgraded
        notes = [choice.reason]
        if choice.upgraded and decision.dtype_note:
            notes.append(decision.dtype_note)
        notes += [e.note for e in mine if e.note]
        fields = {}
        for effect in mine:
            fields.update(effect.fields)
        backend = obs.backend if obs else "unknown"
        dtype = obs.dtype if obs else None
        records.append(record.ComponentRecord(
            checkpoint=plan.checkpoint,
            loaded_class=plan.model_class,
            component=key,
            role=choice.component.role,
            model_class=obs.model_class if obs else choice.component.model_class,
            requested=choice.requested,
            requested_from=plan.request.requested_from.get(key, "caller"),
            decision=choice.backend if choice.backend is not None else "transformers default",
            backend=backend,
            dtype=dtype,
            loaded_backend=backend,
            loaded_dtype=dtype,
            reason="; ".join(notes),
            retried=retried,
            rejected=dict(choice.rejected),
            attempts=tuple(a.to_dict() for a in attempts),
            phases=fields.get("phases", {}),
            by_phase=fields.get("by_phase", {}),
            padding_free=fields.get("padding_free"),
            fast_generate=fields.get("fast_generate"),
            fused_kernels=fields.get("fused_kernels"),
            seconds=round(seconds, 4),
            overhead_ms=overhead_ms,
        ))
    dicts = record.publish(records, model=model)
    _remember_configs(model, decision, keys)
    try:
        ranks.after_load(dicts)
    except Exception as exc:  # the cross-rank check must never cost the caller their model
        _safety.absorb("cross-rank check", exc, "this load was not compared across ranks")


def _remember_configs(model, decision, keys) -> None:
    """Marks the configs that now carry the plugin's choice (FlashAttention-2, or the per-forward fallback),
    with what the caller had asked for, so that handing one to the next load reads the caller's request."""
    config = getattr(model, "config", None)
    for choice in decision.choices:
        if not choice.upgraded or config is None:
            continue
        target = config if not choice.component.key else getattr(config, choice.component.key, None)
        if target is not None:
            fallback = choice.fallback if isinstance(choice.fallback, str) else choice.component.default_backend
            # A copy carries the caller's backend where the switch can bring FlashAttention-2 back (attention
            # interface); with one class per backend (4.46-4.47) the layers' classes travel as they are.
            portable = fallback if choice.component.attention.kind == "interface" else None
            state.remember_config(target, choice.requested, (choice.backend, fallback), portable)

