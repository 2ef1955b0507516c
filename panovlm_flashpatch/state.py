"""What the plugin keeps about a loaded model: one attribute of plain data on the model itself.

Why on the model, and why plain data: a copy of a model must behave like the model. ``copy.deepcopy``
(TRL's reference model), ``pickle`` and ``torch.save`` copy a module's ``__dict__``, so the copy keeps its
per-forward switch, its padding-free arming and its ``report()`` records. Only dicts, lists, strings,
numbers and booleans are stored, so such a copy unpickles in a process without this package too; the
attribute is invisible to ``state_dict()`` and ``save_pretrained``. Reading it costs one dict lookup, the
only thing the per-forward wrappers do for models the plugin did not load.

Also here: which config objects came out of a plugin load, so that a config handed on to the next load
(``from_pretrained(p, config=model.config)``) is not mistaken for the caller's own choice of backend.
"""

from __future__ import annotations

import threading
import weakref

ATTR = "_panovlm_flashpatch"

# ``remove()`` starts a new epoch: state armed in an earlier one is inert from then on (the per-forward
# wrappers pass such models through), and a load that was in flight when it ran arms nothing. One number,
# so a copy made before ``remove()`` is inert too. A list, so that the per-forward path reads it without a
# lock or a function call.
EPOCH = [0]


def of(module) -> dict | None:
    """The plugin's state of ``module`` (None for a module the plugin did not arm)."""
    return getattr(module, "__dict__", {}).get(ATTR)


def live(st) -> bool:
    """State armed since the last ``remove()``."""
    return bool(st) and st.get("epoch") == EPOCH[0]


def ensure(module, epoch: int | None = None) -> dict:
    """The state of ``module``, created (for ``epoch``, default: the current one) when missing."""
    st = module.__dict__.get(ATTR)  # straight into __dict__: nn.Module.__setattr__ would do the same, only slower
    if st is None or st.get("epoch") != (EPOCH[0] if epoch is None else epoch):
        st = module.__dict__[ATTR] = {"epoch": EPOCH[0] if epoch is None else epoch}
    return st


def new_epoch() -> None:
    EPOCH[0] += 1


def forget(module) -> None:
    module.__dict__.pop(ATTR, None)


_lock = threading.Lock()
# id(config) -> (weak reference to it, backends the plugin put there, the caller's request, the backend a copy
# should carry). Keyed by id: transformers 5 configs are not hashable. Entries whose config is gone are dropped
# as new ones come.
_from_plugin: dict[int, tuple] = {}


def remember_config(config, requested, values, portable=None) -> None:
    """``config`` holds one of ``values``, backends the plugin put there; ``requested`` is what the caller asked;
    ``portable``: the backend a pickled or copied config carries instead (runtime/portable.py), or None."""
    try:
        ref = weakref.ref(config)
    except TypeError:  # not weakly referenceable: the next load reads it as the caller's own choice
        return
    with _lock:
        for key in [k for k, entry in _from_plugin.items() if entry[0]() is None]:
            del _from_plugin[key]
        _from_plugin[id(config)] = (ref, frozenset(values), requested, portable)


def portable_backend(config):
    """The backend a copy of ``config`` should carry, when it holds the plugin's choice (else None)."""
    with _lock:
        entry = _from_plugin.get(id(config))
    if entry is None or entry[0]() is not config or entry[3] is None:
        return None
    now = getattr(config, "__dict__", {}).get("_attn_implementation_internal")
    return entry[3] if now in entry[1] and now != entry[3] else None


def caller_request(config):
    """What the caller had asked for, when ``config`` carries the plugin's choice (else ``(False, None)``)."""
    with _lock:
        entry = _from_plugin.get(id(config))
    if entry is None or entry[0]() is not config:
        return False, None
    if getattr(config, "__dict__", {}).get("_attn_implementation_internal") not in entry[1]:
        return False, None  # changed since: then it is the choice of whoever changed it
    return True, entry[2]
