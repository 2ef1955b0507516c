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


class Slot:
    """One attribute of a class in an importable module, wrapped once by :meth:`install` and put back by
    :meth:`uninstall` (which does nothing before the module is imported: then nothing was wrapped)."""

    def __init__(self, module: str, owner: str, name: str, wrapper, marker: str):
        self.module, self.owner, self.name, self.wrapper, self.marker = module, owner, name, wrapper, marker
        self.done = None  # (original entry, installed wrapper) while ours is in place

    def _owner(self):
        import importlib

        return getattr(importlib.import_module(self.module), self.owner)

    def install(self) -> None:
        if self.done is None:
            self.done = wrap_once(self._owner(), self.name, self.wrapper, self.marker)

    def uninstall(self) -> None:
        import sys

        if self.done is not None and self.module in sys.modules and unwrap(self._owner(), self.name, *self.done):
            self.done = None
