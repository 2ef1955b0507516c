"""The plugin's log lines: where they go, at which level, and once-only messages.

Logger ``panovlm_flashpatch``. Who decides what is shown:

* An application that configures logging (a handler on the root logger, ``logging.basicConfig``, a
  framework's set-up) or sets a level on our logger decides: records go through the standard logger and
  its levels, so ``basicConfig(level=logging.WARNING)`` hides our INFO lines. (Records propagating to
  ancestor handlers skip the ancestors' levels, so setting a level on our logger ourselves would print INFO
  lines past such a configuration; we never set one.)
* An application that configured nothing sees INFO and above on stderr, prefixed ``[panovlm_flashpatch]``:
  the per-component lines are the product's output.

Under torchrun/accelerate only local rank 0 logs at INFO (the other ranks at DEBUG); a retry is a WARNING
on every rank. A line that cannot be encoded for stderr (a non-ASCII path on an ASCII terminal) is
written with escapes instead of raising.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

LOGGER_NAME = "panovlm_flashpatch"
_PREFIX = "[panovlm_flashpatch] "

_lock = threading.Lock()
_once: set[str] = set()


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def _application_decides(logger: logging.Logger) -> bool:
    if logging.getLogger().handlers or logger.level != logging.NOTSET:
        return True
    return any(not isinstance(h, logging.NullHandler) for h in logger.handlers) or not logger.propagate


def write_safely(stream, text: str) -> None:
    """Writes ``text``, escaping what the stream's encoding cannot hold (never raises for that)."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))


def emit(level: int, message: str) -> None:
    """Logs one message as README.md describes (see the module docstring)."""
    logger = get_logger()
    if _application_decides(logger):
        logger.log(level, message)
        return
    if level < logging.INFO or logging.root.manager.disable >= level:
        return
    try:
        write_safely(sys.stderr, _PREFIX + message + "\n")
    except Exception:  # a closed or broken stderr must not cost the caller anything
        pass


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
    emit(level, message)


def forget_once() -> None:
    """Lets every once-only message be logged again (tests: "once" is per process)."""
    with _lock:
        _once.clear()


def component_line(rec: dict) -> str:
    """``language model  Qwen3ForCausalLM  [/ckpt]  → flash_attention_2, bfloat16  (why)``."""
    line = f"{rec['role']}  {rec['class']}  [{rec['checkpoint']}]  → {rec['backend']}, {rec['dtype']}  ({rec['reason']})"
    phases = rec.get("by_phase") or {}
    if phases:
        line += "  per phase: " + "; ".join(f"{p} → {c['backend']}" for p, c in phases.items())
    return line


def sentence(text: str, limit: int = 300) -> str:
    """The first sentence of ``text`` (whitespace folded), whole; longer than ``limit``: cut at a word, with "…".

    transformers' messages end in long hints and links; a reason keeps what the error says, never half a word.
    """
    text = " ".join(str(text).split())
    end = text.find(". ")
    first = text[: end + 1] if end > 0 else text
    if len(first) <= limit:
        return first
    cut = first.rfind(" ", 0, limit)
    return first[: cut if cut > 0 else limit].rstrip(",;:") + " …"
