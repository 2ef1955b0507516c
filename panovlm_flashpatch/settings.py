"""Environment variables of the plugin: their names, their accepted values, and how they are read.

Every variable is read at call time (not cached), so a process can flip them between loads. An
unknown value is never silently ignored: it is reported once, with the accepted values, and the
plugin then takes the conservative reading given in the table below.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from . import reporting

# Names (documented in README.md, "Environment variables").
DISABLE_FLASH_ATTN = "DISABLE_FLASH_ATTN"
KEEP_SDPA = "PANOVLM_FLASHPATCH_KEEP_SDPA"
AUTO = "PANOVLM_FLASHPATCH_AUTO"
GENERATE_FA2 = "PANOVLM_FLASHPATCH_GENERATE_FA2"
ENCODERS_FA2 = "PANOVLM_FLASHPATCH_ENCODERS_FA2"
PADDING_FREE = "PANOVLM_FLASHPATCH_PADDING_FREE"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
#: PADDING_FREE's third value: pack, and leave ``logits`` out of a training output that has a loss.
LOSS_ONLY = "loss_only"

# What an unknown value means, chosen so that a typo never makes a run riskier than plain
# transformers: a garbled DISABLE_FLASH_ATTN disables the plugin (the user was reaching for the
# off switch), a garbled KEEP_SDPA keeps the caller's "sdpa", a garbled AUTO turns automatic
# activation off, a garbled GENERATE_FA2 keeps generate() on SDPA and a garbled ENCODERS_FA2 keeps
# encoders on SDPA (the measured faster choices), and a garbled PADDING_FREE leaves training forwards
# padded (packing is opt-in).
_ON_UNKNOWN = {DISABLE_FLASH_ATTN: True, KEEP_SDPA: True, AUTO: False, GENERATE_FA2: False, ENCODERS_FA2: False,
               PADDING_FREE: False}
_DEFAULT = {DISABLE_FLASH_ATTN: False, KEEP_SDPA: False, AUTO: True, GENERATE_FA2: False, ENCODERS_FA2: False,
            PADDING_FREE: False}



@dataclasses.dataclass(frozen=True)
class Settings:
    """The plugin's settings as read from the environment at one moment.

    Attributes:
        disabled: ``DISABLE_FLASH_ATTN`` is set: every load passes through untouched.
        keep_explicit_sdpa: ``PANOVLM_FLASHPATCH_KEEP_SDPA`` is set: a caller's explicit
            ``attn_implementation="sdpa"`` is kept; only an unset request is upgraded.
        auto: ``PANOVLM_FLASHPATCH_AUTO`` is not turned off: the start-up hook may apply the patch.
        encoders_fa2: ``PANOVLM_FLASHPATCH_ENCODERS_FA2`` is set: vision/text/audio encoders may get
            FlashAttention-2 too (by default they keep SDPA, measured faster for them).
        problems: one message per variable whose value was not understood.
    """

    disabled: bool = False
    keep_explicit_sdpa: bool = False
    auto: bool = True
    encoders_fa2: bool = False
    padding_free: bool | str = False
    problems: tuple[str, ...] = ()


def parse_flag(name: str, environ=None) -> tuple[bool, str | None]:
    """Reads one boolean variable.

    Returns:
        ``(value, problem)``: ``problem`` is None when the value was understood, else a message that
        names the variable, the value, the accepted values and what the plugin does instead.
    """
    env = os.environ if environ is None else environ
    raw = env.get(name)
    if raw is None:
        return _DEFAULT[name], None
    value = raw.strip().lower()
    if value in _TRUE:
        return True, None
    if value in _FALSE:
        return False, None
    fallback = _ON_UNKNOWN[name]
    problem = (
        f"{name}={raw!r} is not understood; accepted values are 1/true/yes/on or 0/false/no/off "
        f"(empty means unset). Treating it as {'set' if fallback else 'unset'}."
    )
    return fallback, problem


def parse_padding_free(environ=None) -> tuple[bool | str, str | None]:
    """Reads ``PANOVLM_FLASHPATCH_PADDING_FREE``: a boolean, or ``loss_only``."""
    env = os.environ if environ is None else environ
    raw = env.get(PADDING_FREE)
    if raw is not None and raw.strip().lower().replace("-", "_") == LOSS_ONLY:
        return LOSS_ONLY, None
    value, problem = parse_flag(PADDING_FREE, environ)
    if problem:
        problem = problem.replace("accepted values are 1/true/yes/on", f"accepted values are {LOSS_ONLY}, 1/true/yes/on")
    return value, problem


def read(environ=None) -> Settings:
    """Reads every variable; reports each misunderstood value once per process (as a warning)."""
    disabled, p1 = parse_flag(DISABLE_FLASH_ATTN, environ)
    keep, p2 = parse_flag(KEEP_SDPA, environ)
    auto, p3 = parse_flag(AUTO, environ)
    _, p4 = parse_flag(GENERATE_FA2, environ)  # read per generate() call by phases.py
    encoders, p5 = parse_flag(ENCODERS_FA2, environ)
    padding_free, p6 = parse_padding_free(environ)
    problems = tuple(p for p in (p1, p2, p3, p4, p5, p6) if p)
    for problem in problems:
        # Keyed by the message, as phases.py reports GENERATE_FA2: one warning per bad value.
        reporting.log_once(problem, logging.WARNING, problem)
    return Settings(disabled=disabled, keep_explicit_sdpa=keep, auto=auto, encoders_fa2=encoders,
                    padding_free=padding_free, problems=problems)


def known_variables() -> dict[str, str | None]:
    """The raw values of our variables as set in this process (None when unset), for the doctor."""
    return {name: os.environ.get(name) for name in (DISABLE_FLASH_ATTN, KEEP_SDPA, AUTO, GENERATE_FA2, ENCODERS_FA2,
                                                 PADDING_FREE)}
