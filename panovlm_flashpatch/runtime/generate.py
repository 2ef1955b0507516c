"""Marks the forwards that run inside ``generate()`` of a model the plugin armed (dispatch.py reads the mark).

``GenerationMixin.generate`` is wrapped once. For a model whose state says a component of it switches per
forward, the wrapper reads ``PANOVLM_FLASHPATCH_GENERATE_FA2`` / ``apply(generate_fa2=...)`` once per call
and, unless it keeps FlashAttention-2, counts the call in a thread-local depth for its duration (nested
calls, such as an assistant model's generate, count too). At entry the armed components are put on their
fallback at once (dispatch.enter_generate), because with a static cache transformers builds the masks outside
the forwards, for the backend in place. Nothing needs restoring: each later forward picks its own backend, and
whatever a user set themselves is left alone.
"""

from __future__ import annotations

import sys
import threading

from .. import state
from .._wrapping import unwrap, wrap_once

_MARKER = "_self_panovlm_flashpatch_generate"
_local = threading.local()
_installed: dict[str, object] = {}


def active() -> bool:
    return getattr(_local, "depth", 0) > 0


def _generate(wrapped, instance, args, kwargs):
    st = state.of(instance) if instance is not None else None
    if not state.live(st) or not st.get("switches"):
        return wrapped(*args, **kwargs)
    from ..settings import current

    if current().generate_fa2:
        return wrapped(*args, **kwargs)
    try:
        from . import dispatch

        dispatch.enter_generate(instance)
    except Exception as exc:  # each forward still picks its backend
        from .. import _safety

        _safety.absorb("generate() switch", exc, "its forwards picked their backend one by one")
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        return wrapped(*args, **kwargs)
    finally:
        _local.depth -= 1


def install() -> None:
    from transformers.generation.utils import GenerationMixin

    done = wrap_once(GenerationMixin, "generate", _generate, _MARKER)
    if done is not None:
        _installed["original"], _installed["wrapper"] = done


def uninstall() -> None:
    if "wrapper" not in _installed or "transformers.generation.utils" not in sys.modules:
        return
    from transformers.generation.utils import GenerationMixin

    if unwrap(GenerationMixin, "generate", _installed["original"], _installed["wrapper"]):
        _installed.clear()
