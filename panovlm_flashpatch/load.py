"""Load with the decision, and fall back when transformers refuses it for an attention reason.

The fallback gives the refused components back to the caller's own request (the component that
transformers names, else every upgraded one). Once nothing is upgraded any more, the call is the
caller's call, unchanged: whatever it raises then is exactly what plain transformers raises.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import threading
import time

from . import reporting
from .decide import Decision

# transformers' attention checks live in functions with these words in their names, across
# 4.46-5.x: _autoset_attn_implementation, _check_and_enable_flash_attn_2, _check_and_enable_sdpa,
# _check_and_adjust_attn_implementation, get_correct_attn_implementation, _flash_attn_can_dispatch,
# _flash_attn_import_error, _sdpa_can_dispatch, lazy_import_flash_attention, output_attentions.
_ATTN_FUNCTION = re.compile(r"attn|attention|flash|sdpa", re.IGNORECASE)
# Exception types those checks raise (ValueError and ImportError swapped roles across versions);
# OSError/RuntimeError cover a flash-attn build that fails while transformers imports it.
_ATTN_TYPES = (ImportError, ValueError, OSError, RuntimeError)
# transformers sets torch's *process-global* default dtype during a load and restores it after.
# Two threads loading at once with different dtypes (ours injects bf16) can restore each other's
# value and leave bf16 as the default for the rest of the process (seen in tests/test_load.py with
# 8 threads). Loads that go through the plugin are therefore serialized; re-entrant loads in the
# same thread pass (RLock), and a load that waits longer than this proceeds anyway, so a loader
# that loads from a helper thread and waits for it is delayed, never deadlocked.
_LOAD_LOCK = threading.RLock()
LOCK_TIMEOUT_S = 120.0
_NAMES_CLASS = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*) does not support")


@dataclasses.dataclass(frozen=True)
class Attempt:
    attn_implementation: object
    dtype: str | None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"attn_implementation": self.attn_implementation, "dtype": self.dtype, "error": self.error}


def raised_by_attention_check(exc: BaseException) -> bool:
    """True when ``exc`` was raised inside one of transformers' attention checks.

    Classifies by where the error comes from (the traceback's frames), not by its message: the
    messages and even the types changed across versions, the places did not.
    """
    if not isinstance(exc, _ATTN_TYPES):
        return False
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        module = frame.f_globals.get("__name__", "")
        if module.startswith("transformers.") and _ATTN_FUNCTION.search(frame.f_code.co_name):
            return True
        tb = tb.tb_next
    return False


def culprit_keys(message: str, decision: Decision) -> set[str]:
    """Components to give back after a refusal: the one whose class the message names, else all
    upgraded ones (messages such as "flash_attn seems to be not installed" name no component)."""
    upgraded = {c.component.key for c in decision.choices if c.upgraded}
    match = _NAMES_CLASS.match(message)
    if match:
        named = {c.component.key for c in decision.choices if c.component.model_class == match.group(1)}
        if named & upgraded:
            return named & upgraded
    return upgraded


def dtype_name(value) -> str | None:
    """A dtype as a plain name: ``torch.bfloat16`` -> ``"bfloat16"``, ``"auto"`` stays, a per-component
    dict -> ``"per-component"``, None stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "per-component"
    return str(value).replace("torch.", "")


def caller_dtype(kwargs) -> object:
    """The dtype the caller gave (``dtype`` wins over ``torch_dtype``, as in transformers 4.56+)."""
    if kwargs.get("dtype") is not None:
        return kwargs["dtype"]
    return kwargs.get("torch_dtype")


def attempt_kwargs(kwargs: dict, decision: Decision, dtype_kwarg: str) -> dict:
    """A new kwargs dict for one attempt. The caller's dict and config object are not touched:
    transformers deep-copies a passed config before it writes the attention choice into it."""
    import torch

    new = dict(kwargs)
    new["attn_implementation"] = decision.attn_argument()
    if decision.inject_dtype:
        new[dtype_kwarg] = getattr(torch, decision.inject_dtype)
    return new


def _short(exc: BaseException) -> str:
    """``Type: message``, whitespace folded, whole (the attempt record keeps what transformers said)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _gist(exc: BaseException) -> str:
    """The first sentence of the error, for a log line: transformers' messages end in long hints."""
    return f"{type(exc).__name__}: {reporting.sentence(exc)}"


def load_with_fallback(wrapped, args, kwargs, decision: Decision, dtype_kwarg: str, caller_attn: object):
    """Calls ``wrapped`` with the decision, falling back per component on attention refusals.

    Returns:
        ``(result, final_decision, attempts, seconds)``; ``result`` is exactly what
        ``from_pretrained`` returned (a model, or a tuple with ``output_loading_info=True``).

    Raises:
        Whatever the caller's own call raises, unchanged; and any error of an attempt we changed
        that is not an attention refusal (missing files, corrupt weights, out of memory), as raised.
    """
    acquired = _LOAD_LOCK.acquire(timeout=LOCK_TIMEOUT_S)
    try:
        return _load_with_fallback(wrapped, args, kwargs, decision, dtype_kwarg, caller_attn)
    finally:
        if acquired:
            _LOAD_LOCK.release()


def _load_with_fallback(wrapped, args, kwargs, decision: Decision, dtype_kwarg: str, caller_attn: object):
    import torch

    attempts: list[Attempt] = []
    start = time.perf_counter()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    while decision.changed:
        kw = attempt_kwargs(kwargs, decision, dtype_kwarg)
        default_dtype = torch.get_default_dtype()
        allocated = torch.cuda.memory_allocated() if cuda else 0
        try:
            result = wrapped(*args, **kw)
        except BaseException as exc:
            # transformers 4.46-4.48 leave the default dtype at bf16 after a failed load.
            torch.set_default_dtype(default_dtype)
            if not raised_by_attention_check(exc):
                raise
            message = str(exc)
            attempts.append(Attempt(kw["attn_implementation"], decision.inject_dtype or dtype_name(caller_dtype(kwargs)), _short(exc)))
            keys = culprit_keys(message, decision)
            decision = decision.without_fa2(keys, f"flash_attention_2 refused at load ({_gist(exc)}); fell back to the caller's setting")
            del exc
        else:
            attempts.append(Attempt(kw["attn_implementation"], decision.inject_dtype or dtype_name(caller_dtype(kwargs))))
            return result, decision, tuple(attempts), time.perf_counter() - start
        # A refused attempt may have left modules on the GPU, held by reference cycles of its
        # traceback: collect them, but only then (a full collection costs tens of milliseconds).
        # The allocator's cache is kept: emptying it made the next load allocate from scratch
        # (measured: a load with one refusal took 2x a plain load; benchmarks/results).
        if cuda and torch.cuda.memory_allocated() > allocated:
            gc.collect()
    if decision.overrides_config:  # the caller's config carries an earlier plugin load's choice, not theirs
        kwargs = {**kwargs, "attn_implementation": decision.attn_argument()}
        caller_attn = kwargs["attn_implementation"]
    result = wrapped(*args, **kwargs)
    attempts.append(Attempt(caller_attn, dtype_name(caller_dtype(kwargs))))
    return result, decision, tuple(attempts), time.perf_counter() - start
