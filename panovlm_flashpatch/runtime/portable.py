"""A pickled or copied config carries the caller's backend, not the plugin's FlashAttention-2.

Why: ``torch.save(model)`` on a GPU machine, ``torch.load`` on one without flash-attn (or where the plugin is
off or absent) would otherwise run FlashAttention-2 there, baked into the config, and fail; plain
transformers' pickle runs anywhere. So while the plugin is applied, ``PretrainedConfig`` gets a
``__getstate__`` that, for a config holding the plugin's choice (state.remember_config), writes the backend
the caller would have had (SDPA, say) into the copy's state. Everything else is the config's ``__dict__``.

In the same process nothing is lost: ``copy.deepcopy`` goes through the same ``__getstate__``, and the
copy's per-forward switch (state travels with the model) puts it back on FlashAttention-2 at its first forward
that can run it. Unpickling needs nothing of the plugin.

``from_config(model.config)`` too: transformers 5 builds the new model on the very config object it is given
(4.x copies it), so a model built from a plugin-loaded model's config would run the plugin's choice without
its switch. While applied, ``_from_config`` gets a copy of such a config (with the caller's backend), unless
the call names an ``attn_implementation`` itself.
"""

from __future__ import annotations

import copy

from .. import state
from .._wrapping import Slot
from .varlen import KEY as VARLEN

_installed: dict[str, object] = {}
_MARKER = "_self_panovlm_flashpatch_from_config"


def _getstate(self):
    copied = self.__dict__.copy()
    try:
        backend = state.portable_backend(self)
    except Exception:  # a copy as plain Python makes it
        backend = None
    if backend is not None:
        copied["_attn_implementation_internal"] = backend
    if copied.get("_attn_implementation_internal") == VARLEN:  # SDPA, where the plugin is not
        copied["_attn_implementation_internal"] = "sdpa"
    return copied


def _from_config(wrapped, instance, args, kwargs):
    config = args[0] if args else kwargs.get("config")
    if config is not None and "attn_implementation" not in kwargs:
        try:
            carried = state.portable_backend(config) is not None
        except Exception:
            carried = False
        if carried:
            copied = copy.deepcopy(config)  # through _getstate: the caller's backend
            args = (copied,) + tuple(args[1:]) if args else args
            if not args:
                kwargs = {**kwargs, "config": copied}
    return wrapped(*args, **kwargs)


_SLOT = Slot("transformers.modeling_utils", "PreTrainedModel", "_from_config", _from_config, _MARKER)


def install() -> None:
    from ..compat import config_base_class

    base = config_base_class()
    if "class" not in _installed and vars(base).get("__getstate__") in (None, _getstate):
        base.__getstate__ = _getstate  # transformers defines none; if it ever does, not ours to replace
        _installed["class"] = base
    _SLOT.install()


def uninstall() -> None:
    base = _installed.pop("class", None)
    if base is not None and vars(base).get("__getstate__") is _getstate:
        del base.__getstate__
    _SLOT.uninstall()



