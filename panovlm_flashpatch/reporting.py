"""The per-component report: one log line per component per load, and the same as records.

Log lines go to the stdlib logger ``panovlm_flashpatch``. They are visible by default (INFO, on
stderr) until the application configures logging itself; from then on they simply propagate to
the application's handlers, so nothing is printed twice. Under torchrun/accelerate only local
rank 0 logs at INFO (the other ranks at DEBUG); a retry is a WARNING on every rank.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import weakref

LOGGER_NAME = "panovlm_flashpatch"
#: Records kept for report(): the newest loads, so a long-running server does not grow forever.
MAX_RECORDS = 512

_lock = threading.Lock()
_records: collections.deque = collections.deque(maxlen=MAX_RECORDS)
_by_model: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_once: set[str] = set()


class _DefaultHandler(logging.StreamHandler):
    """Prints our records only while the application has configured no logging of its own."""

    def __init__(self):
        super().__init__(stream=None)

    def emit(self, record):
        if logging.getLogger().handlers:
            return  # the application's handlers get it through propagation
        self.stream = sys.stderr  # follow redirections (pytest's capsys, contextlib.redirect_stderr)
        super().emit(record)


def get_logger() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _DefaultHandler) for h in logger.handlers):
        handler = _DefaultHandler()
        handler.setFormatter(logging.Formatter("[panovlm_flashpatch] %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger


def is_local_main_process() -> bool:
    """Local rank 0, or not launched by torchrun/accelerate at all."""
    rank = os.environ.get("LOCAL_RANK", "").strip()
    return rank in ("", "0") or not rank.isdigit()


def info_level() -> int:
    """INFO on local rank 0, DEBUG on the other ranks (one copy of each line per machine)."""
    return logging.INFO if is_local_main_process() else logging.DEBUG


def log_once(key: str, level: int, message: str) -> None:
    with _lock:
        if key in _once:
            return
        _once.add(key)
    get_logger().log(level, message)


def component_line(rec: dict) -> str:
    """``language model  Qwen3ForCausalLM  [/ckpt]  → flash_attention_2, bfloat16  (why)``."""
    return f"{rec['role']}  {rec['class']}  [{rec['checkpoint']}]  → {rec['backend']}, {rec['dtype']}  ({rec['reason']})"


def publish(records: list[dict], model=None) -> None:
    """Stores the records of one load and logs one line per component."""
    json.dumps(records)  # fail here, in our code, if a record ever stops being JSON-serialisable
    with _lock:
        _records.extend(records)
        if model is not None:
            try:
                _by_model[model] = records
            except TypeError:  # an object that cannot be weakly referenced: keep the global list only
                pass
    logger = get_logger()
    level = info_level()
    for rec in records:
        logger.log(logging.WARNING if rec["retried"] else level, component_line(rec))


def report(model=None) -> list[dict]:
    """The records of every load so far (oldest first), or of one loaded model.

    Each record is a JSON-serialisable dict with: ``checkpoint``, ``loaded_class``, ``component``
    (sub-config key, ``""`` for a plain model), ``role``, ``class``, ``requested``, ``decision``,
    ``backend`` (what the attention modules run), ``dtype``, ``reason``, ``retried``, and
    ``attempts`` (each ``{attn_implementation, dtype, error}``).
    """
    with _lock:
        if model is not None:
            return [dict(r) for r in _by_model.get(model, [])]
        return [dict(r) for r in _records]


def clear() -> None:
    with _lock:
        _records.clear()
        _by_model.clear()
