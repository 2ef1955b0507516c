"""panovlm_flashpatch: FlashAttention-2 for every transformers model load, when it can run.

Public API::

    import panovlm_flashpatch
    panovlm_flashpatch.apply()          # wrap PreTrainedModel.from_pretrained (once); options below
    # panovlm_flashpatch.apply(padding_free=True): also run padded training forwards packed
    # panovlm_flashpatch.apply(fast_generate=True): generate() on a static cache, its decode step compiled
    model = AutoModelForCausalLM.from_pretrained(path)
    panovlm_flashpatch.report(model)    # per component: backend, dtype, reason, attempts
    panovlm_flashpatch.remove()         # restore the originals exactly, forget the options

Importing this package imports neither torch nor transformers; the probe runs at the first load.
"""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["apply", "remove", "is_applied", "report", "clear_report", "__version__"]


def apply(keep_explicit_sdpa: bool | None = None, padding_free: bool | str | None = None,
          encoders_fa2: bool | None = None, generate_fa2: bool | None = None,
          fast_generate: bool | None = None, sdpa_flash_first: bool | None = None) -> bool:
    """Patches ``transformers.PreTrainedModel.from_pretrained`` (once) and sets the options given.

    Calling it again (or after automatic activation) installs nothing twice; it only updates the options
    passed. Each option left as None keeps its current value (unset: its environment variable decides).

    Args:
        keep_explicit_sdpa: keep a caller's explicit ``attn_implementation="sdpa"`` (``PANOVLM_FLASHPATCH_KEEP_SDPA``).
        padding_free: ``"auto"`` (the default): padded training forwards of verified causal LMs that run
            FlashAttention-2 run packed; True: on SDPA/eager too; ``"loss_only"``: True, outputs with a loss
            carry no logits, and their loss is computed from the hidden states in chunks (the full logits never
            exist: runtime/chunked_loss.py); False: never (``PANOVLM_FLASHPATCH_PADDING_FREE``).
        encoders_fa2: vision/text/audio encoders may take FlashAttention-2 (``PANOVLM_FLASHPATCH_ENCODERS_FA2``).
        generate_fa2: ``generate()`` stays on FlashAttention-2 (``PANOVLM_FLASHPATCH_GENERATE_FA2``).
        fast_generate: ``generate()`` decodes on a static KV cache whose decode step transformers compiles: several
            times faster per token after a one-off compilation of tens of seconds (``PANOVLM_FLASHPATCH_FAST_GENERATE``;
            README "Fast generation").
        sdpa_flash_first: SDPA training forwards of a new shape try torch's flash kernel before cuDNN, whose
            per-shape plan builds cost plain transformers up to 2x on Hopper (``PANOVLM_FLASHPATCH_SDPA_FLASH_FIRST``;
            on by default).

    Returns:
        True when the patch is in place; False when the plugin stands aside (an unsupported transformers).
    """
    from .patch import apply as _apply

    return _apply(keep_explicit_sdpa=keep_explicit_sdpa, padding_free=padding_free, encoders_fa2=encoders_fa2,
                  generate_fa2=generate_fa2, fast_generate=fast_generate, sdpa_flash_first=sdpa_flash_first)


def remove() -> bool:
    """Undo :func:`apply`: every class attribute is the original object again, the options are forgotten, models
    loaded so far run as plain transformers, and a pending automatic activation is cancelled (one that would
    otherwise patch once transformers' modeling module is imported). True if something was removed or cancelled."""
    from ._bootstrap import cancel
    from .patch import remove as _remove

    cancelled = cancel()
    return _remove() or cancelled


def is_applied() -> bool:
    from .patch import is_applied as _is_applied

    return _is_applied()


def report(model=None) -> list[dict]:
    """Per-component records (JSON-serialisable): of every load so far as recorded at load, or of one
    model, read from it now (record.py documents every field)."""
    from .record import report as _report

    return _report(model)


def clear_report() -> None:
    """Forgets the records of earlier loads (a model's own records stay with it)."""
    from .record import clear as _clear

    _clear()
