"""Runs ``generate()`` of a model the plugin loaded: on the fast path when it applies, between
dispatch.enter_generate and dispatch.leave_generate when a component switches per forward.

``GenerationMixin.generate`` is wrapped once. The wrapper reads ``PANOVLM_FLASHPATCH_FAST_GENERATE`` /
``apply(fast_generate=...)`` once per call: fast_generate.py decides whether the call decodes on a static cache
with a compiled step (the call's own arguments gain the cache settings; nothing else changes). For a model
whose state says a component of it switches per forward, the wrapper also reads ``PANOVLM_FLASHPATCH_GENERATE_FA2`` / ``apply(generate_fa2=...)`` once per call and,
unless it keeps FlashAttention-2, marks the call (every forward inside picks the generate backend), puts the
armed components on their fallback at once (with a static cache transformers builds the masks outside the
forwards, for the backend in place), and puts them back on what the plugin loaded when it returns or raises.
Whatever someone else set is left alone (dispatch.py).
"""

from __future__ import annotations

import threading

from .. import _safety, state
from .._wrapping import Slot
from . import dispatch, fast_generate

_MARKER = "_self_panovlm_flashpatch_generate"
_inside = threading.local()  # generate() calls of armed models running in this thread


def _generate(wrapped, instance, args, kwargs):
    st = state.of(instance) if instance is not None else None
    if not state.live(st):
        return wrapped(*args, **kwargs)
    from ..settings import current

    settings = current()
    tally, fast = fast_generate.tally_of(instance) if st.get("generate") else None, None
    # A generate() run from inside another (an assistant model's, in assisted generation) is transformers' own
    # business: it is neither counted nor given a static cache.
    if tally is not None and not getattr(_inside, "depth", 0):
        try:
            fast = fast_generate.prepare(instance, tally, args, kwargs, settings)
        except Exception as exc:  # the call runs as the caller wrote it
            _safety.absorb("fast_generate", exc, "generate() ran on transformers' default cache")
    switch = bool(st.get("switches")) and not settings.generate_fa2
    if switch:
        try:
            dispatch.enter_generate(instance)
        except Exception as exc:  # each forward still picks its backend
            _safety.absorb("generate() switch", exc, "its forwards picked their backend one by one")
    _inside.depth = getattr(_inside, "depth", 0) + 1
    try:
        if fast is None:
            return wrapped(*args, **kwargs)
        return fast_generate.run(fast, wrapped, instance, tally, args, kwargs)
    finally:
        _inside.depth -= 1
        if switch:
            try:
                dispatch.leave_generate(instance)
            except Exception as exc:  # the next forward picks its backend anyway
                _safety.absorb("generate() switch", exc, "the model stays on SDPA until its next forward")


_SLOT = Slot("transformers.generation.utils", "GenerationMixin", "generate", _generate, _MARKER)
install, uninstall = _SLOT.install, _SLOT.uninstall
