"""One wrapper per model class ``forward``: the per-forward features of armed models, in order.

A class's ``forward`` is wrapped once (a plain function with ``functools.wraps``, behind a marker) the
first time a model of that class is armed, and put back by ``uninstall()``. Not wrapt here: TorchDynamo
guards on a class ``forward``'s ``__closure__`` when it inlines an inner module, and a wrapt object there
fails that guard ("Guard failed on the same frame it was created"); ``inspect.signature`` still reads the
original through ``__wrapped__`` (Trainer drops the dataset columns a forward does not take by it). For a model the plugin did not arm the wrapper costs one dict
lookup. For an armed one it runs, in this order:

1. dispatch (dispatch.py): put the component on the backend this forward needs;
2. SDPA order (sdpa_order.py): on SDPA, a training forward of a new shape runs with the flash kernel first;
3. padding-free (padding_free.py): run a padded training forward packed, on that backend;
4. the original ``forward``.

Under ``torch.compile`` (``fullgraph=True`` included) every call passes straight through: a compiled
graph keeps the backend and the padding it was traced with, and nothing here may break the trace
(no lock, no weak dictionary, no logging on this path). A bug of ours in steps 1-2 is absorbed
(_safety.py) and the call runs as plain transformers would run it.
"""

from __future__ import annotations

import functools
import types

import torch

from .. import _safety, state
from . import dispatch, padding_free, sdpa_order

_MARKER = "_panovlm_flashpatch_forward"
_installed: dict[type, tuple[object, object]] = {}  # class defining forward -> (original entry, our wrapper)

try:
    _compiling = torch.compiler.is_compiling
except AttributeError:  # torch < 2.3
    from torch._dynamo import is_compiling as _compiling


def _wrapper_for(original):
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        st = self.__dict__.get(state.ATTR)
        if not st or st.get("epoch") != state.EPOCH[0]:  # not armed, or armed before the last remove()
            return original(self, *args, **kwargs)
        if _compiling():
            if "dispatch" in st:
                dispatch.before_trace(self, st["dispatch"])
            return original(self, *args, **kwargs)
        armed = st.get("dispatch")
        if armed is not None:
            try:
                dispatch.before(self, armed, args, kwargs)
            except Exception as exc:  # the component stays on the backend it is on
                _safety.absorb("per-forward backend switch", exc, f"{type(self).__name__} ran on its current backend")
        scope = None
        if st.get("sdpa_order"):
            try:
                scope = sdpa_order.scope(self, args, kwargs)
            except Exception as exc:
                _safety.absorb("SDPA kernel order", exc, f"{type(self).__name__} ran on torch's own SDPA order")
        if scope is None:
            return _packed_or_plain(self, st, original, args, kwargs)
        with scope:
            return _packed_or_plain(self, st, original, args, kwargs)

    setattr(forward, _MARKER, True)
    return forward


def _packed_or_plain(module, st, original, args, kwargs):
    packing = st.get("padding_free")
    if packing is not None and packing.get("armed"):  # inactive ones too: the backend may change, and says why
        return padding_free.forward(types.MethodType(original, module), module, args, kwargs, packing)
    return original(module, *args, **kwargs)


def defining_class(cls) -> type:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return klass
    raise TypeError(f"{cls.__name__} has no forward")


def ensure(cls) -> None:
    """Wraps the ``forward`` that instances of ``cls`` run (once per defining class)."""
    owner = defining_class(cls)
    entry = vars(owner)["forward"]
    if getattr(entry, _MARKER, False) or not callable(entry):
        return
    wrapper = _wrapper_for(entry)
    setattr(owner, "forward", wrapper)
    _installed[owner] = (entry, wrapper)


def uninstall() -> None:
    """Restores every ``forward`` we wrapped; armed models then run as plain transformers."""
    for owner, (original, wrapper) in list(_installed.items()):
        if vars(owner).get("forward") is wrapper:  # something wrapped on top of ours stays, with ours inside
            setattr(owner, "forward", original)
        del _installed[owner]


def installed_classes() -> list[type]:
    return list(_installed)

