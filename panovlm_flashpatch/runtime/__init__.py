"""What the plugin does to a model after its load: one module per feature, behind one small protocol.

A feature module exposes ``attach(model, load) -> {component key or None: Effect}`` (None: every
component of the load). ``attach`` arms the loaded model with plain data on it (state.py); the Effects say
what the load's records and log lines gain. Here, after the features: the class-level wrappers that act
on armed models are installed once (forward.py for every armed module's class, generate.py when a
component switches per forward; save.py installs its own). patch.py calls :func:`attach` after every load
and :func:`uninstall` from ``remove()``; adding a feature is one new module and one line in ``_features``.

* switch   - dispatch.py + generate.py + forward.py: per forward, FlashAttention-2 or the fallback backend;
* padding-free - padding_free.py: padded training forwards of causal LMs run packed (opt-in);
* save     - save.py: ``save_pretrained`` keeps the checkpoint's dtype;
* fast generate - fast_generate.py + generate.py: ``generate()`` on a static cache, its decode step compiled (opt-in).

(ranks.py compares the finished records across ranks; it runs after the records exist, see patch.py.)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from .. import _safety


@dataclasses.dataclass(frozen=True)
class Effect:
    """What arming one feature adds to a component's record: a phrase for its reason, and record fields."""

    note: str = ""
    fields: Mapping[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Load:
    """One finished load, as the features need it (frozen; nothing here changes the model)."""

    checkpoint: str
    keys: tuple[str, ...]
    decision: object  # decide.Decision, after any retry
    observed: Mapping[str, object]  # component key -> observe.Observed
    settings: object  # settings.Settings of this load
    load_dtype: str | None  # the dtype transformers alone would have loaded


def _features():
    from . import dispatch, fast_generate, padding_free, save

    return (("switch", dispatch), ("padding-free", padding_free), ("save", save), ("fast generate", fast_generate))


def attach(model, load: Load) -> dict[str | None, list[Effect]]:
    """Arms ``model`` with every feature that applies; a feature that fails is skipped, the load is kept."""
    from .. import state
    from . import dispatch, forward, generate, portable

    effects: dict[str | None, list[Effect]] = {}
    for name, feature in _features():
        try:
            found = feature.attach(model, load) or {}
        except Exception as exc:
            _safety.absorb(f"arming {name}", exc, f"the model was loaded without {name}")
            continue
        for key, effect in found.items():
            effects.setdefault(key, []).append(effect)
    for module in model.modules():
        st = state.of(module)
        if state.live(st) and ("dispatch" in st or "padding_free" in st):
            forward.ensure(type(module))
    top = state.of(model)
    if state.live(top) and top.get("switches"):
        dispatch.install()
        portable.install()
    if state.live(top) and (top.get("switches") or "generate" in top):
        generate.install()
    return effects


def uninstall() -> None:
    """Puts back every class attribute the features wrapped; armed models then run as plain transformers."""
    from . import dispatch, fast_generate, forward, generate, portable, save

    fast_generate.uninstall()
    forward.uninstall()
    generate.uninstall()
    dispatch.uninstall()
    portable.uninstall()
    save.uninstall()
