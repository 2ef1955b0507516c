"""transformers code that reads a model's backend by name and accepts only the names it knows.

Why: the plugin's choice can be a name such code refuses where plain transformers' "sdpa" passes, and a program
that ran without the plugin must not fail with it:

* continuous batching (``generate_batch``, ``init_continuous_batching``; transformers 5) accepts "sdpa",
  "paged|eager" and flash backends, and refuses the key of a model that trained packed on torch's varlen kernel
  (``ValueError: Implementation panovlm_varlen is not supported for continuous batching``);
* Trainer's context parallelism (its torch backend; transformers >= 4.57) accepts "sdpa" only and refuses
  FlashAttention-2 (``ValueError: Context parallelism is supported only with SDPA attention``) before the first step.

How: each entry point is wrapped (once, while the plugin is applied), and hands the model back first: the varlen key
goes back to "sdpa" (varlen.release: outside a packed step it computes what SDPA computes; while one is in flight,
a forward in another thread or one whose backward has not ended, its recompute needs the key, so the model keeps it
and the refusal stands, with a warning that says when to call instead), and for context
parallelism a model the plugin put on FlashAttention-2 goes to SDPA for good, as if its caller had chosen it
(``set_attn_implementation``), with packing off (context parallelism shards each sequence across GPUs; a packed row's
boundaries would not survive that). A backend the caller chose is left alone: the error is then transformers' own.
"""

from __future__ import annotations

import logging
import sys

from .. import _safety, reporting, state
from .._wrapping import Slot
from . import varlen

SDPA = "sdpa"


def _before_continuous_batching(wrapped, instance, args, kwargs):
    """``model.init_continuous_batching(...)``."""
    _hand_to_continuous_batching(instance)
    return wrapped(*args, **kwargs)


def _before_cb_name_check(wrapped, instance, args, kwargs):
    """``ContinuousBatchingManager.switch_to_cb_friendly_attn(self, model, ...)``: where transformers 5 reads the name."""
    _hand_to_continuous_batching(args[0] if args else kwargs.get("model"))
    return wrapped(*args, **kwargs)


def _hand_to_continuous_batching(model) -> None:
    try:
        if hasattr(model, "modules"):
            _release_for("continuous batching", model)
    except Exception as exc:
        _safety.absorb("continuous batching", exc, "the model went to continuous batching as it was")


def _release_for(what: str, model) -> None:
    """Hands ``model`` back from the varlen key to "sdpa" for ``what``, or says why it cannot (a step in flight)."""
    if varlen.busy(model):
        reporting.log_once(f"readers:busy:{what}", logging.WARNING,
                           f"{what} needs the backend name 'sdpa', and {type(model).__name__} is inside a packed "
                           "training step (a forward running in another thread, or one whose backward has not run: "
                           f"its recompute needs the plugin's key, {varlen.KEY}), so it keeps the key and {what} "
                           "refuses it. Start it after the step's backward, or train with "
                           "PANOVLM_FLASHPATCH_PADDING_FREE=0.")
    elif varlen.release(model):
        reporting.log_once(f"readers:released:{what}", logging.INFO,
                           f"padding-free: {what} needs the backend name 'sdpa': the language model's config goes "
                           f"back from the plugin's key ({varlen.KEY}) to 'sdpa' (the next packed training forward "
                           "puts it on the key again)")


def _context_parallel(trainer) -> bool:
    """The trainer shards sequences with torch's context parallelism (the backend that requires SDPA)."""
    config = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
    return bool(config is not None and getattr(config, "cp_enabled", False)
                and getattr(config, "cp_backend", "torch") == "torch")  # 4.57 has no cp_backend: torch's


def hand_back_to_sdpa(model) -> str | None:
    """Puts a model the plugin armed on SDPA for good, packing off; returns what it was on, or None if untouched."""
    from . import dispatch

    was = model.config._attn_implementation
    _release_for("context parallelism", model)
    switched = [armed for _, armed in dispatch._armed_modules(model)
                if not armed["spec"].get("user") and armed["spec"]["fallback"] == SDPA]
    st = state.of(model)
    packs = state.live(st) and (st.get("padding_free") or {}).get("armed")
    if not switched and not packs:
        return None
    if packs:
        st["padding_free"] = {**st["padding_free"], "armed": False, "active": False,
                              "reason": "off since context parallelism took the model (it shards sequences)"}
    if switched:  # through dispatch's wrapper: the caller's choice from now on (the switch stands aside)
        model.set_attn_implementation(SDPA)
    return was


def _before_context_parallel(wrapped, instance, args, kwargs):
    try:
        model = args[0] if args else kwargs.get("model")
        if _context_parallel(instance) and hasattr(model, "config"):
            was = hand_back_to_sdpa(model)
            if was is not None:
                reporting.log_once(f"readers:context-parallel:{type(model).__name__}", logging.WARNING,
                                   f"{type(model).__name__}: Trainer's context parallelism requires SDPA; the plugin "
                                   f"had put it on {varlen.public(was)}: it runs SDPA from now on, its training "
                                   "forwards not packed (DISABLE_FLASH_ATTN=1 loads it so from the start)")
    except Exception as exc:
        _safety.absorb("context parallelism", exc, "the model went to context parallelism as it was")
    return wrapped(*args, **kwargs)


_CB = "transformers.generation.continuous_batching.continuous_api"
_SLOTS = (
    Slot(_CB, "ContinuousMixin", "init_continuous_batching", _before_continuous_batching,
         "_self_panovlm_flashpatch_continuous_batching"),
    # where the name is checked (transformers 5): also reached by a subclass's own init_continuous_batching
    Slot(_CB, "ContinuousBatchingManager", "switch_to_cb_friendly_attn", _before_cb_name_check,
         "_self_panovlm_flashpatch_cb_name_check"),
    Slot("transformers.trainer", "Trainer", "_prepare_context_parallel_inputs", _before_context_parallel,
         "_self_panovlm_flashpatch_context_parallel"),
)


#: install() was called since the last uninstall(): a module imported later gets its wrapper then.
_wanted = [False]
_hooked: set[str] = set()


def install() -> None:
    """Wraps each entry point whose module is imported; the others when they are (``import transformers.trainer``
    costs seconds and is the caller's to make, not ours)."""
    import wrapt

    _wanted[0] = True
    for slot in _SLOTS:
        if slot.module in sys.modules:
            _install(slot)
        elif slot.module not in _hooked:
            _hooked.add(slot.module)
            wrapt.register_post_import_hook(lambda module, slot=slot: _wanted[0] and _install(slot), slot.module)


def _install(slot) -> None:
    try:
        slot.install()
    except (ImportError, AttributeError):  # this transformers has no such entry point
        pass
    except Exception as exc:
        _safety.absorb(f"wrapping {slot.owner}.{slot.name}", exc, "that code sees the model's backend as it is")


def uninstall() -> None:
    _wanted[0] = False
    for slot in _SLOTS:
        slot.uninstall()
