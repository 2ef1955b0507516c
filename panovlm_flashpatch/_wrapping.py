"""Wrap a function attribute of a class or module once, behind a marker, and put it back exactly.

Shared by runtime/generate.py (``GenerationMixin.generate``), runtime/forward.py (a model class's ``forward``),
ranks.py (``torch.distributed.init_process_group``). The marker makes wrapping idempotent (wrapping
twice would run the wrapper twice per call); unwrapping restores the ``__dict__`` entry by identity,
and only while ours is still the one there (something wrapped on top must not be dropped).
"""

from __future__ import annotations


def wrap_once(owner, name: str, wrapper, marker: str):
    """Wraps ``owner.<name>`` (looked up in ``owner.__dict__``) with a wrapt wrapper.

    Returns ``(original entry, installed wrapper)``, or None when the entry is missing or already ours.
    The marker must start with ``_self_`` so that wrapt stores it on the wrapper, not the wrapped function.
    """
    import wrapt

    entry = vars(owner).get(name)
    if entry is None or getattr(entry, marker, False):
        return None
    wrapt.wrap_function_wrapper(owner, name, wrapper)
    installed = vars(owner)[name]
    setattr(installed, marker, True)
    return entry, installed


def unwrap(owner, name: str, original, installed) -> bool:
    """Puts ``original`` back if ``installed`` is still the entry there; True when it did."""
    if vars(owner).get(name) is installed:
        setattr(owner, name, original)
        return True
    return False
