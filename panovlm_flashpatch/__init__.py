"""panovlm_flashpatch: FlashAttention-2 for every transformers model load, when it can run.

Public API::

    import panovlm_flashpatch
    panovlm_flashpatch.apply()          # wrap PreTrainedModel.from_pretrained (idempotent)
    # panovlm_flashpatch.apply(padding_free=True): also run padded training forwards packed
    model = AutoModelForCausalLM.from_pretrained(path)
    panovlm_flashpatch.report(model)    # per component: backend, dtype, reason, attempts
    panovlm_flashpatch.remove()         # restore the original exactly

Importing this package imports neither torch nor transformers; the probe runs at the first load.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["apply", "remove", "is_applied", "report", "clear_report", "__version__"]


def apply(keep_explicit_sdpa: bool | None = None, padding_free: bool | str | None = None) -> bool:
    """Patch ``transformers.PreTrainedModel.from_pretrained`` (see :func:`.patch.apply`)."""
    from .patch import apply as _apply

    return _apply(keep_explicit_sdpa=keep_explicit_sdpa, padding_free=padding_free)


def remove() -> bool:
    """Undo :func:`apply`; the class attribute is the original object again."""
    from .patch import remove as _remove

    return _remove()


def is_applied() -> bool:
    from .patch import is_applied as _is_applied

    return _is_applied()


def report(model=None) -> list[dict]:
    """Structured per-component records of the loads so far, or of one model (JSON-serialisable)."""
    from .reporting import report as _report

    return _report(model)


def clear_report() -> None:
    from .reporting import clear as _clear

    _clear()
