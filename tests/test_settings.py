"""Environment variables: accepted values, and unknown values reported with the accepted ones."""

from __future__ import annotations

import logging

import pytest

from panovlm_flashpatch import settings


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", " 1 "])
def test_disable_accepts_true_values(value):
    assert settings.read({"DISABLE_FLASH_ATTN": value}).disabled


@pytest.mark.parametrize("value", ["0", "false", "no", "off", ""])
def test_disable_false_values_mean_unset(value):
    s = settings.read({"DISABLE_FLASH_ATTN": value})
    assert not s.disabled and not s.problems


def test_unset_defaults():
    s = settings.read({})
    assert (s.disabled, s.keep_explicit_sdpa, s.auto, s.problems) == (False, False, True, ())


@pytest.mark.parametrize(
    "name, attribute, fallback",
    [("DISABLE_FLASH_ATTN", "disabled", True), ("PANOVLM_FLASHPATCH_KEEP_SDPA", "keep_explicit_sdpa", True),
     ("PANOVLM_FLASHPATCH_AUTO", "auto", False), ("PANOVLM_FLASHPATCH_ENCODERS_FA2", "encoders_fa2", False),
     ("PANOVLM_FLASHPATCH_GENERATE_FA2", None, None)],
)
def test_unknown_value_is_reported_with_the_accepted_values(name, attribute, fallback, caplog):
    caplog.set_level(logging.WARNING, logger="panovlm_flashpatch")
    s = settings.read({name: "maybe-" + name})
    if attribute is not None:
        assert getattr(s, attribute) is fallback
    else:  # read per generate() call; unknown means "keep generate() on SDPA"
        assert settings.parse_flag(name, {name: "maybe"})[0] is False
    (problem,) = s.problems
    assert name in problem and "1/true/yes/on" in problem and "0/false/no/off" in problem
    assert any(problem == r.getMessage() for r in caplog.records)
