"""The plugin's settings: the environment, overlaid by the options given to ``apply()``; one place for both.

Every load reads them afresh (:func:`current`), so a process can flip a variable between loads. The
options passed to ``apply()`` are kept here as one overlay: an option passed wins over its variable, an
option left out (None) keeps what an earlier ``apply()`` set, and ``remove()`` forgets them all. The
start-up hook's own activation passes no option, so it never resets what the program asked for.
Each setting remembers where it came from, so a message can name the switch the user actually used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Mapping

from . import _env
from . import reporting

# Re-exported names: the variables, documented in README.md ("Environment variables").
DISABLE_FLASH_ATTN = _env.DISABLE_FLASH_ATTN
KEEP_SDPA = _env.KEEP_SDPA
AUTO = _env.AUTO
GENERATE_FA2 = _env.GENERATE_FA2
ENCODERS_FA2 = _env.ENCODERS_FA2
PADDING_FREE = _env.PADDING_FREE
FAST_GENERATE = _env.FAST_GENERATE
SDPA_FLASH_FIRST = _env.SDPA_FLASH_FIRST
LOSS_ONLY = _env.LOSS_ONLY
AUTO_VALUE = _env.AUTO_VALUE

#: Setting -> its environment variable. All but the first two can also be given to ``apply()``.
VARIABLE_OF = {
    "disabled": DISABLE_FLASH_ATTN,
    "auto": AUTO,
    "keep_explicit_sdpa": KEEP_SDPA,
    "encoders_fa2": ENCODERS_FA2,
    "generate_fa2": GENERATE_FA2,
    "padding_free": PADDING_FREE,
    "fast_generate": FAST_GENERATE,
    "sdpa_flash_first": SDPA_FLASH_FIRST,
}
OPTIONS = ("keep_explicit_sdpa", "encoders_fa2", "generate_fa2", "padding_free", "fast_generate", "sdpa_flash_first")
_ACCEPTED = {"padding_free": (True, False, LOSS_ONLY, AUTO_VALUE)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings at one moment.

    Attributes:
        disabled: ``DISABLE_FLASH_ATTN`` is set: every load passes through untouched.
        auto: the start-up hook may apply the patch (``PANOVLM_FLASHPATCH_AUTO`` not turned off).
        keep_explicit_sdpa: a caller's explicit ``attn_implementation="sdpa"`` is kept.
        encoders_fa2: vision/text/audio encoders may get FlashAttention-2 (by default they keep SDPA).
        generate_fa2: ``generate()`` stays on FlashAttention-2 (by default it runs on SDPA).
        padding_free: ``"auto"`` (the default: forwards that run FlashAttention-2 are packed), True (SDPA/eager
            too), ``"loss_only"`` (True, outputs with a loss carry no logits, their loss computed in chunks) or False: padded training forwards
            of verified causal LMs run packed.
        fast_generate: ``generate()`` decodes on a static cache with transformers' compiled decode step.
        sdpa_flash_first: SDPA training forwards of a new shape try torch's flash kernel before cuDNN.
        problems: one message per variable whose value was not understood.
        sources: setting -> where its value came from (``"apply(padding_free=True)"``,
            ``"PANOVLM_FLASHPATCH_KEEP_SDPA=1"``, or ``"default"``).
    """

    disabled: bool = False
    auto: bool = True
    keep_explicit_sdpa: bool = False
    encoders_fa2: bool = False
    generate_fa2: bool = False
    padding_free: bool | str = AUTO_VALUE
    fast_generate: bool = False
    sdpa_flash_first: bool = True
    problems: tuple[str, ...] = ()
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def source(self, setting: str) -> str:
        """Where ``setting`` came from, for a message: the option or variable to change."""
        return self.sources.get(setting, "default")


_lock = threading.Lock()
_overrides: dict[str, object] = {}


def set_overrides(**options) -> None:
    """Keeps the options given to ``apply()`` (None: leave as it is). Raises ValueError on a bad value,
    before anything is changed."""
    for name, value in options.items():
        if name not in OPTIONS:
            raise TypeError(f"apply() got an unexpected option {name!r} (options: {', '.join(OPTIONS)})")
        accepted = _ACCEPTED.get(name, (True, False))
        if value is not None and value not in accepted:
            raise ValueError(f"{name}={value!r}: use {', '.join(repr(a) for a in accepted)} or None "
                             f"(None keeps the current setting; unset, {VARIABLE_OF[name]} decides)")
    # 1 and 0 pass the check above (1 == True): kept as the booleans they mean.
    options = {k: (bool(v) if type(v) is int else v) for k, v in options.items()}
    with _lock:
        _overrides.update({k: v for k, v in options.items() if v is not None})


def clear_overrides() -> None:
    with _lock:
        _overrides.clear()


def overrides() -> dict[str, object]:
    with _lock:
        return dict(_overrides)


def current(environ=None) -> Settings:
    """The environment overlaid by ``apply()``'s options; reports each misunderstood value once (a warning)."""
    env = os.environ if environ is None else environ
    values, sources, problems = {}, {}, []
    given = overrides()
    for setting, name in VARIABLE_OF.items():
        value, problem = _env.read(name, env)
        if problem:
            problems.append(problem)
            # Keyed by the message: one warning per bad value per process.
            reporting.log_once(problem, logging.WARNING, problem)
        raw = (env.get(name) or "").strip()
        if setting in given:
            value = given[setting]
            sources[setting] = f"apply({setting}={value!r})"
        else:
            sources[setting] = f"{name}={raw}" if raw else "default"
        values[setting] = value
    return Settings(problems=tuple(problems), sources=sources, **values)


#: Kept for callers of the 0.1 API.
read = current


def known_variables(environ=None) -> dict[str, str | None]:
    """The raw values of our variables in this process (None when unset), for the doctor."""
    env = os.environ if environ is None else environ
    return {name: env.get(name) for name in _env.NAMES}
