"""Settings: environment variables (one table, _env.py) overlaid by apply()'s options (settings.py)."""

from __future__ import annotations

import logging

import pytest

import panovlm_flashpatch
from panovlm_flashpatch import _env, settings

ALL = list(_env.NAMES)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", " 1 "])
def test_disable_accepts_true_values(value):
    assert settings.current({"DISABLE_FLASH_ATTN": value}).disabled


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "", "   "])
def test_disable_false_values_mean_unset(value):
    s = settings.current({"DISABLE_FLASH_ATTN": value})
    assert not s.disabled and not s.problems


def test_unset_defaults():
    s = settings.current({})
    assert (s.disabled, s.keep_explicit_sdpa, s.auto, s.encoders_fa2, s.generate_fa2, s.padding_free,
            s.sdpa_flash_first, s.problems) == (False, False, True, False, False, "auto", True, ())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("empty", ["", "  "])
def test_empty_means_not_set_for_every_variable(name, empty):
    # Fault: PANOVLM_FLASHPATCH_AUTO= (empty) silently turned automatic activation off.
    assert settings.current({name: empty}) == settings.current({})
    assert _env.read(name, {name: empty}) == (_env.VARIABLES[name][0], None)


@pytest.mark.parametrize(
    "name, attribute, fallback, effect",
    [("DISABLE_FLASH_ATTN", "disabled", True, "the plugin is off"),
     ("PANOVLM_FLASHPATCH_KEEP_SDPA", "keep_explicit_sdpa", True, "an explicit attn_implementation='sdpa' is kept"),
     ("PANOVLM_FLASHPATCH_AUTO", "auto", False, "automatic activation is off"),
     ("PANOVLM_FLASHPATCH_ENCODERS_FA2", "encoders_fa2", False, "encoders keep SDPA"),
     ("PANOVLM_FLASHPATCH_GENERATE_FA2", "generate_fa2", False, "generate() runs on SDPA"),
     ("PANOVLM_FLASHPATCH_PADDING_FREE", "padding_free", False, "padding-free packing is off")],
)
def test_unknown_value_is_reported_with_the_accepted_values_and_its_effect(name, attribute, fallback, effect, caplog):
    caplog.set_level(logging.WARNING, logger="panovlm_flashpatch")
    s = settings.current({name: "maybe-" + name})
    assert getattr(s, attribute) is fallback
    (problem,) = s.problems
    assert name in problem and "1/true/yes/on" in problem and "0/false/no/off" in problem
    # The message says what the plugin does with it: "treating it as unset" was wrong for AUTO (unset is on).
    assert f"Until it is fixed, {effect}" in problem and "unset" not in problem.split("Until")[1]
    assert any(problem == r.getMessage() for r in caplog.records)


def test_sources_name_the_switch_that_was_used():
    s = settings.current({"PANOVLM_FLASHPATCH_KEEP_SDPA": "yes"})
    assert s.source("keep_explicit_sdpa") == "PANOVLM_FLASHPATCH_KEEP_SDPA=yes" and s.source("auto") == "default"
    settings.set_overrides(keep_explicit_sdpa=True)
    try:
        assert settings.current({}).source("keep_explicit_sdpa") == "apply(keep_explicit_sdpa=True)"
    finally:
        settings.clear_overrides()


def test_apply_options_overlay_the_environment_and_remove_forgets_them(monkeypatch):
    monkeypatch.setenv("PANOVLM_FLASHPATCH_PADDING_FREE", "1")
    assert panovlm_flashpatch.apply(padding_free=False)
    assert settings.current().padding_free is False
    assert panovlm_flashpatch.apply()  # an option left out keeps its value
    assert settings.current().padding_free is False
    assert panovlm_flashpatch.apply(padding_free="loss_only", generate_fa2=True)
    assert (settings.current().padding_free, settings.current().generate_fa2) == ("loss_only", True)
    panovlm_flashpatch.remove()
    assert settings.current().padding_free is True  # the variable again


@pytest.mark.parametrize("bad", [{"padding_free": "loss"}, {"keep_explicit_sdpa": "yes"}])
def test_a_bad_option_is_refused_and_changes_nothing(bad):
    with pytest.raises(ValueError, match="None keeps the current setting"):
        panovlm_flashpatch.apply(**bad)
    assert settings.overrides() == {}
