"""What the plugin does to a model after its load: one module per feature, behind one small protocol.

A feature module exposes ``attach(model, load) -> {component key or None: Effect}`` (None: every
component of the load). ``attach`` arms the loaded model with plain data on it (state.py); the Effects say
what the load's records and log lines gain. Here, after the features: the class-level wrappers that act
on armed models are installed once (forward.py for every armed module's class, generate.py when a
component switches per forward; save.py installs its own). patch.py calls :func:`attach` after every load
and :func:`uninstall` from ``remove()``; adding a feature is one new module and one line in ``_features``.

* switch   - dispatch.py + generate.py + forward.py: per forward, FlashAttention-2 or the fallback backend;
* padding-free - padding_free.py: padded training forwards of causal LMs run packed (on FlashAttention-2 by default,
  or without flash-attn on torch's varlen kernel, varlen.py, which padding_free.py switches to per packed forward);
* save     - save.py: ``save_pretrained`` keeps the checkpoint's dtype;
* fast generate - fast_generate.py + generate.py: ``generate()`` on a static cache, its decode step compiled (opt-in);
* SDPA order - sdpa_order.py: SDPA training forwards of a new shape try torch's flash kernel before cuDNN, and
  batch-1 training forwards of an FA2 language model run there (measured faster).

The per-phase choice these features carry out is stated in one place, backends.py; :func:`attach` asks it for
each component's ``by_phase`` record field once the features are armed.

(ranks.py compares the finished records across ranks; it runs after the records exist, see patch.py. fused.py
reports fused kernels others put in the model, liger-kernel's; it arms nothing. readers.py hands an armed model
back to "sdpa" where transformers code accepts only backend names it knows: continuous batching, context
parallelism.)
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
    caps: object = None  # probe.Capabilities the decision read (None: not probed)


def _features():
    from . import dispatch, fast_generate, padding_free, save, sdpa_order

    # sdpa_order after dispatch: it marks the switch's spec of the components it arms.
    return (("switch", dispatch), ("padding-free", padding_free), ("save", save), ("fast generate", fast_generate),
            ("SDPA order", sdpa_order))


#: State keys whose features act per forward (runtime/forward.py runs them).
_PER_FORWARD = ("dispatch", "padding_free", "sdpa_order")


def attach(model, load: Load) -> dict[str | None, list[Effect]]:
    """Arms ``model`` with every feature that applies; a feature that fails is skipped, the load is kept."""
    from .. import state
    from . import dispatch, forward, generate, portable, readers

    effects: dict[str | None, list[Effect]] = {}
    for name, feature in _features():
        try:
            found = feature.attach(model, load) or {}
        except Exception as exc:
            _safety.absorb(f"arming {name}", exc, f"the model was loaded without {name}")
            continue
        for key, effect in found.items():
            effects.setdefault(key, []).append(effect)
    armed_any = False
    for module in model.modules():
        st = state.of(module)
        armed_any = armed_any or state.live(st)
        if state.live(st) and any(k in st for k in _PER_FORWARD):
            forward.ensure(type(module))
    try:
        for key, effect in _phases(model, load, effects).items():
            effects.setdefault(key, []).append(effect)
    except Exception as exc:
        _safety.absorb("stating the per-phase backends", exc, "the record has no by_phase field")
    try:
        from . import fused

        found = fused.describe(model)  # after the wrappers: liger's forward inside ours is not "replaced"
        if found:
            effects.setdefault(None, []).append(Effect(fields={"fused_kernels": found}))
    except Exception as exc:
        _safety.absorb("looking for fused kernels", exc, "the record does not say whether any are present")
    top = state.of(model)
    if state.live(top) and top.get("switches"):
        dispatch.install()
        portable.install()
    elif any((state.of(m) or {}).get("sdpa_order") for m in model.modules()):
        dispatch.install()  # its set_attn_implementation wrapper: a backend the user sets turns the SDPA order off
    if state.live(top) and (top.get("switches") or "generate" in top):
        generate.install()
    if armed_any:
        readers.install()  # code that accepts only backend names it knows gets the model on "sdpa" first
    return effects


def _phases(model, load: Load, effects) -> dict[str, Effect]:
    """Each component's backend per phase, from backends.py's table and what the features armed."""
    from .. import backends, state
    from . import padding_free

    caps = load.caps
    out = {}
    for choice in load.decision.choices:
        key = choice.component.key
        fields = {}
        for effect in effects.get(key, []) + effects.get(None, []):
            fields.update(effect.fields)
        seen = getattr(load.observed.get(key), "backend", None) or choice.backend or "unknown"
        fallback = choice.fallback if isinstance(choice.fallback, str) else choice.component.default_backend
        packing, packing_reason, varlen_reason = None, "", None
        st = state.of(model) or {}
        packs_here = not key or key == padding_free.COMPOSITES.get(getattr(model.config, "model_type", None))
        pf = st.get("padding_free") if packs_here else None
        if pf and pf.get("armed"):
            if pf.get("auto"):
                packing = "fa2"
            else:
                packing = "all" if padding_free.backend_reason(model, "sdpa") is None else "fa2"
            if not pf.get("active") and not pf.get("auto"):
                packing_reason = pf.get("reason", "")
            varlen_reason = pf.get("varlen", "not checked")
        elif isinstance(fields.get("padding_free"), str):
            packing_reason = fields["padding_free"]
        elif not load.settings.padding_free:
            packing_reason = f"padding-free is off ({load.settings.source('padding_free')})"
        elif packs_here and seen == backends.FA2 and not choice.upgraded:
            packing_reason = ("the caller chose flash_attention_2: by default the plugin packs only loads it decided "
                              "(padding_free=True packs this one too)")
        if packs_here and not (pf and pf.get("armed")):
            varlen_reason = (packing_reason or padding_free.varlen_reason(model, load)
                             or "padding-free is not armed for this load")
        spec = _spec_of(model, key)
        flash_first = fields.get("sdpa_flash_first", "")
        facts = backends.Facts(
            role=choice.component.role,
            loaded=seen,
            fa2_blockers=tuple(r for r in [choice.rejected.get(backends.FA2)] if r),
            fallback=fallback if seen == backends.FA2 else seen,
            packing=packing,
            packing_reason=packing_reason,
            unpadded_row=bool(spec and spec.get("unpadded_row")),
            flash_first=bool(flash_first) and not flash_first.startswith("off"),
            flash_first_reason=flash_first or "the plugin did not arm it for this component",
            varlen_reason=varlen_reason if packs_here else "packing happens at the language model",
            generate_fa2=bool(load.settings.generate_fa2),
            caller_choice=None if choice.requested in (None, "sdpa") and (choice.upgraded or "keeps it" not in choice.reason)
            else choice.reason,
            capability=getattr(caps, "capability", None),
            fa3_error=getattr(caps, "fa3_error", "not probed"),
            fa4_error=getattr(caps, "fa4_error", "not probed"),
        )
        fields_out = {"by_phase": backends.phases_for(facts)}
        if spec is not None and spec.get("unpadded_row"):
            from . import dispatch

            fields_out["phases"] = dispatch.describe(spec, load.settings.generate_fa2)  # gained "batch-1 training"
        out[key] = Effect(fields=fields_out)
    return out


def _spec_of(model, key: str):
    from . import dispatch

    return next((armed["spec"] for _, armed in dispatch._armed_modules(model) if armed["spec"]["key"] == key), None)


def uninstall() -> None:
    """Puts back every class attribute the features wrapped; armed models then run as plain transformers."""
    from . import dispatch, fast_generate, forward, generate, portable, readers, save, varlen

    readers.uninstall()
    varlen.disengage()
    fast_generate.uninstall()
    forward.uninstall()
    generate.uninstall()
    dispatch.uninstall()
    portable.uninstall()
    save.uninstall()
