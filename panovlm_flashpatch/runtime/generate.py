"""Runs ``generate()`` of a model the plugin armed between dispatch.enter_generate and dispatch.leave_generate.

``GenerationMixin.generate`` is wrapped once. For a model whose state says a component of it switches per
forward, the wrapper reads ``PANOVLM_FLASHPATCH_GENERATE_FA2`` / ``apply(generate_fa2=...)`` once per call and,
unless it keeps FlashAttention-2, marks the call (every forward inside picks the generate backend), puts the
armed components on their fallback at once (with a static cache transformers builds the masks outside the
forwards, for the backend in place), and puts them back on what the plugin loaded when it returns or raises.
Whatever someone else set is left alone (dispatch.py).
"""

from __future__ import annotations


from .. import _safety, state
from .._wrapping import Slot
from . import dispatch

_MARKER = "_self_panovlm_flashpatch_generate"


def _generate(wrapped, instance, args, kwargs):
    st = state.of(instance) if instance is not None else None
    if not state.live(st) or not st.get("switches"):
        return wrapped(*args, **kwargs)
    from ..settings import current

    if current().generate_fa2:
        return wrapped(*args, **kwargs)
    try:
        dispatch.enter_generate(instance)
    except Exception as exc:  # each forward still picks its backend
        _safety.absorb("generate() switch", exc, "its forwards picked their backend one by one")
    try:
        return wrapped(*args, **kwargs)
    finally:
        try:
            dispatch.leave_generate(instance)
        except Exception as exc:  # the next forward picks its backend anyway
            _safety.absorb("generate() switch", exc, "the model stays on SDPA until its next forward")


_SLOT = Slot("transformers.generation.utils", "GenerationMixin", "generate", _generate, _MARKER)
install, uninstall = _SLOT.install, _SLOT.uninstall
