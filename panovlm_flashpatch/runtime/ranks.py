"""Across ranks: ranks that loaded the same model onto different attention backends are named, never silently.

Why: every rank probes its own GPU and its own flash-attn. One rank whose flash-attn extension fails
to import ends on SDPA while the others run FlashAttention-2: one model trained on different kernels
and numerics per rank, with nothing said. Here each rank compares what it got with what the others got.

How, without ever blocking: after a load, when ``torch.distributed``'s default process group exists,
the rank writes a summary of what it got (backend, dtype and reason per component) into the process
group's key-value store, then reads the summaries other ranks have already written (a non-blocking
``check``) and warns on any disagreement, naming the ranks. The last rank to finish that load sees
every other rank's summary, so a disagreement is always reported at least there. No collective is
called: a model loaded on some ranks only (an evaluation model on rank 0) costs nothing and can never
hang. Loads made before the process group exists (Lightning builds its models before setting up DDP)
are kept and checked when ``init_process_group`` returns (wrapped while the plugin is applied).

A load is matched across ranks by checkpoint, class and how many times this rank loaded that pair
before, so ranks that load the same models in the same order compare like with like.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading

from .. import _safety, reporting
from .._wrapping import unwrap, wrap_once

_PREFIX = "panovlm_flashpatch/load/"
_MARKER = "_self_panovlm_flashpatch_ranks"
_MAX_PENDING = 64

_lock = threading.Lock()
_seen: collections.Counter = collections.Counter()
_pending: collections.deque = collections.deque(maxlen=_MAX_PENDING)
_installed: dict[str, tuple[object, object]] = {}


def summary(records: list[dict]) -> dict:
    """What a rank got, per component: the comparable part (backend, dtype) and the reason."""
    return {r["component"] or "model": {"role": r["role"], "got": f"{r['backend']}/{r['dtype']}", "reason": r["reason"]}
            for r in records}


def load_key(records: list[dict]) -> str:
    first = records[0]
    pair = f"{first['checkpoint']}|{first['loaded_class']}"
    with _lock:
        nth = _seen[pair]
        _seen[pair] += 1
    digest = hashlib.sha1(f"{pair}|{nth}".encode()).hexdigest()[:16]
    return digest


def _process_group():
    """(store, rank, world size) of the default process group, or None when there is none."""
    import sys

    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    from torch.distributed import distributed_c10d

    get_store = getattr(distributed_c10d, "_get_default_store", None)
    if get_store is None:
        return None
    return get_store(), dist.get_rank(), dist.get_world_size()


def after_load(records: list[dict]) -> None:
    """Publishes this rank's summary and compares it with the ranks that published before."""
    if not records:
        return
    entry = (load_key(records), records[0]["checkpoint"], records[0]["loaded_class"], summary(records))
    group = _process_group()
    if group is None:
        with _lock:
            _pending.append(entry)  # compared once init_process_group returns, if it ever does
        return
    _compare(group, entry)


def flush_pending() -> None:
    group = _process_group()
    if group is None:
        return
    with _lock:
        entries = list(_pending)
        _pending.clear()
    for entry in entries:
        _compare(group, entry)


def _compare(group, entry) -> None:
    store, rank, world = group
    key, checkpoint, loaded_class, mine = entry
    store.set(f"{_PREFIX}{key}/{rank}", json.dumps(mine))
    theirs = {rank: mine}
    for other in range(world):
        name = f"{_PREFIX}{key}/{other}"
        if other != rank and store.check([name]):
            theirs[other] = json.loads(store.get(name))
    message = disagreement(checkpoint, loaded_class, theirs)
    if message:
        reporting.log_once(f"ranks:{key}:{sorted(theirs)}", logging.WARNING, message)


def disagreement(checkpoint: str, loaded_class: str, by_rank: dict[int, dict]) -> str | None:
    """The warning for ranks that got different backends/dtypes for one load (None when they agree)."""
    parts = []
    components = sorted({c for s in by_rank.values() for c in s})
    for component in components:
        groups: dict[str, list[int]] = collections.defaultdict(list)
        reasons: dict[str, str] = {}
        for rank in sorted(by_rank):
            got = by_rank[rank].get(component, {"got": "not loaded", "reason": ""})
            groups[got["got"]].append(rank)
            reasons.setdefault(got["got"], got.get("reason", ""))
        if len(groups) < 2:
            continue
        role = next((s[component]["role"] for s in by_rank.values() if component in s), component)
        # The largest group first; the odd ones out carry their reason, which says what to fix.
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1]))
        described = []
        for i, (got, ranks) in enumerate(ordered):
            label = f"{got} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            described.append(label if i == 0 else f"{label} ({reasons[got]})")
        parts.append(f"{role}: " + "; ".join(described))
    if not parts:
        return None
    return (f"ranks disagree on the attention backend of {loaded_class} [{checkpoint}]: " + " | ".join(parts)
            + ". One model on different kernels per rank computes different numbers on each; fix the odd rank's "
            "environment (python -m panovlm_flashpatch on that machine says why), or set DISABLE_FLASH_ATTN=1 on every rank.")


def _init_wrapper(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    try:
        flush_pending()
    except Exception as exc:  # the caller's process group matters more than our check
        _safety.absorb("cross-rank check", exc, "the process group was set up; loads were not compared across ranks")
    return result


def install() -> None:
    """Wraps ``torch.distributed.init_process_group`` (both names it is reachable by), once."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if not dist.is_available():
        return
    from torch.distributed import distributed_c10d

    with _lock:
        for module in (dist, distributed_c10d):
            done = wrap_once(module, "init_process_group", _init_wrapper, _MARKER)
            if done is not None:
                _installed[module.__name__] = done


def uninstall() -> None:
    import sys

    with _lock:
        for name, (original, wrapper) in list(_installed.items()):
            module = sys.modules.get(name)
            if module is not None:
                unwrap(module, "init_process_group", original, wrapper)
            del _installed[name]
        _pending.clear()
