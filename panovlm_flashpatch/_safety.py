"""The safety net: a bug of the plugin's own is logged once and never reaches the user's program.

Every place where our code runs inside the user's call (planning a load, observing it, arming a model,
a per-forward decision, packing a batch, saving) catches its own exceptions here and falls back to what
plain transformers would do. ``internal_errors`` keeps what was absorbed (bounded: a recurring bug in a
long-running server must not grow it forever); the test suite asserts that it stays empty.
"""

from __future__ import annotations

import logging

from . import reporting

internal_errors: list[str] = []
_MAX_INTERNAL_ERRORS = 100


def absorb(what: str, exc: BaseException, consequence: str) -> None:
    """Records our own failure in ``what`` and warns once per (what, error type).

    Args:
        what: where it happened ("plan", "padding-free", ...).
        exc: the exception, which does not propagate.
        consequence: what the user's program gets instead ("the load passed through untouched").
    """
    internal_errors.append(f"{what}: {type(exc).__name__}: {exc}")
    del internal_errors[:-_MAX_INTERNAL_ERRORS]
    reporting.log_once(f"internal:{what}:{type(exc).__name__}", logging.WARNING,
                       f"{what}: {type(exc).__name__}: {reporting.sentence(exc)} — {consequence}. "
                       "This is a bug of panovlm_flashpatch; please report it.")
