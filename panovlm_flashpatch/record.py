"""The load record: one declared schema for ``report()``, the log lines and the cross-rank check.

One :class:`ComponentRecord` per component per load. ``report()`` returns every load so far as it was
recorded at load (the newest ``MAX_RECORDS``); ``report(model)`` returns that model's records read again
from the model as it is now: ``backend`` and ``dtype`` are current (after ``.half()``, ``.to(...)`` or a
``set_attn_implementation`` of the user's), ``loaded_backend`` and ``loaded_dtype`` stay what the load
gave. The records of a model travel with it (state.py): a deepcopy or an unpickled copy reports the same.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
from typing import Mapping

from . import reporting, state

#: Records kept for report(): the newest loads, so a long-running server does not grow forever.
MAX_RECORDS = 512

_lock = threading.Lock()
_records: collections.deque = collections.deque(maxlen=MAX_RECORDS)


@dataclasses.dataclass(frozen=True)
class ComponentRecord:
    """What one component of one load got, and why.

    Attributes:
        checkpoint: the path or name given to ``from_pretrained``.
        loaded_class: the class ``from_pretrained`` was called on (``LlavaForConditionalGeneration``).
        component: the sub-config key (``"text_config"``), ``""`` for a plain model.
        role: ``language model``, ``vision encoder``, ``text encoder``, ``audio encoder``, ...
        model_class: the component's own class (``Qwen3Model``); ``"class"`` in :meth:`to_dict`.
        requested: the caller's ``attn_implementation`` for it (None: unset).
        requested_from: ``"caller"``, or where the request was read when the caller's config came out of an
            earlier plugin load (the plugin's choice there is never taken for the caller's).
        decision: what the plugin asked transformers for (``"transformers default"`` when left unset).
        backend: what the component's attention modules run (for a plain training or prefill forward).
        dtype: its weights' dtype.
        loaded_backend, loaded_dtype: the same, as the load gave them.
        reason: one line: why.
        retried: transformers refused the plugin's first choice at load, and the caller's was loaded.
        rejected: backend -> why it was not chosen.
        attempts: each ``from_pretrained`` attempt: ``{attn_implementation, dtype, error}``.
        phases: situation -> backend, where a forward runs another backend than ``backend``
            (``{"generate()": "sdpa", "float32 outside autocast": "sdpa", ...}``).
        by_phase: phase -> ``{"backend", "why", "rejected": {backend: reason}}`` (backends.py): what padded and
            unpadded training forwards, decoding, encoder forwards and float32 forwards outside autocast run.
        padding_free: the padding-free status, when the switch is on (else None).
        fast_generate: the fast-generate status of a language model, when the switch is on or was used (else None):
            calls on the static cache, compilations, cache lengths, calls left to the default cache and why.
        fused_kernels: fused kernels someone else put in the model (liger-kernel's RMSNorm, SwiGLU, its fused
            linear cross-entropy forward), read again by ``report(model)``; None when there are none.
        seconds: time the load took; overhead_ms: the plugin's own part of it.
    """

    checkpoint: str
    loaded_class: str
    component: str
    role: str
    model_class: str
    requested: object
    requested_from: str
    decision: object
    backend: str
    dtype: str | None
    loaded_backend: str
    loaded_dtype: str | None
    reason: str
    retried: bool
    rejected: Mapping[str, str]
    attempts: tuple
    phases: Mapping[str, str]
    by_phase: Mapping[str, Mapping[str, object]]
    padding_free: str | None
    fast_generate: str | None
    fused_kernels: str | None
    seconds: float
    overhead_ms: float

    def to_dict(self) -> dict:
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["class"] = out.pop("model_class")
        return out


FIELDS = tuple(("class" if f.name == "model_class" else f.name) for f in dataclasses.fields(ComponentRecord))


def _jsonable(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def publish(records: list[ComponentRecord], model=None) -> list[dict]:
    """Stores the records of one load (globally and on the model) and logs one line per component."""
    dicts = [r.to_dict() for r in records]
    json.dumps(dicts)  # fail here, in our code, if a record ever stops being JSON-serialisable
    with _lock:
        _records.extend(dicts)
    if model is not None and hasattr(model, "__dict__"):
        state.ensure(model)["records"] = [dict(d) for d in dicts]
    level = reporting.info_level()
    for rec in dicts:
        reporting.emit(logging.WARNING if rec["retried"] else level, reporting.component_line(rec))
    return dicts


def report(model=None) -> list[dict]:
    """The records of every load so far (oldest first), or of one loaded model, read from it now."""
    if model is None:
        with _lock:
            return [dict(r) for r in _records]
    st = state.of(model)
    records = [dict(r) for r in (st or {}).get("records", [])]
    if records:
        _read_again(model, records)
    return records


def clear() -> None:
    with _lock:
        _records.clear()


def _read_again(model, records: list[dict]) -> None:
    from .observe import observe

    keys = tuple(r["component"] for r in records if r["component"])
    seen = observe(model, keys)
    switched = _switched(model)
    fast = _fast_generate_status(model)
    from .runtime import fused

    found = fused.describe(model)
    for rec in records:
        if rec["role"] == "language model" or len(records) == 1:
            rec["fused_kernels"] = found
        if fast is not None and (rec["role"] == "language model" or len(records) == 1):
            rec["fast_generate"] = fast
        now = seen.get(rec["component"])
        if now is None:
            continue
        backend = now.backend
        shared = switched.get(rec["component"])
        if shared is not None and not shared.get("user") and backend in (shared["loaded"], shared["fallback"]):
            backend = shared["loaded"]  # the per-forward switch is in charge: the last forward's pick is not news
        rec["backend"], rec["dtype"] = backend, now.dtype


def _fast_generate_status(model) -> str | None:
    from .runtime import fast_generate
    from .settings import current

    tally = fast_generate.tally_of(model) if (state.of(model) or {}).get("generate") else None
    return fast_generate.status(model, tally, current()) if tally is not None else None


def _switched(model) -> dict[str, dict]:
    found = {}
    for module in model.modules():
        armed = (state.of(module) or {}).get("dispatch")
        if armed is not None:
            found.setdefault(armed["spec"]["key"], armed["spec"])
    return found
