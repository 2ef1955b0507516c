"""apply / remove / is_applied: idempotent, exact restore, subclasses keep their own cls."""

from __future__ import annotations

import logging

import transformers
import wrapt

import panovlm_flashpatch
from panovlm_flashpatch import patch as patch_module

PTM = transformers.PreTrainedModel


def test_apply_is_idempotent_and_remove_restores_the_exact_object():
    original = PTM.__dict__["from_pretrained"]
    assert not panovlm_flashpatch.is_applied()
    assert panovlm_flashpatch.apply() and panovlm_flashpatch.apply()
    installed = PTM.__dict__["from_pretrained"]
    assert installed is not original and isinstance(installed, wrapt.FunctionWrapper)
    assert installed.__wrapped__ is original  # one layer, not two
    assert panovlm_flashpatch.is_applied()
    assert panovlm_flashpatch.remove()
    assert PTM.__dict__["from_pretrained"] is original
    assert not panovlm_flashpatch.is_applied()
    assert not panovlm_flashpatch.remove()


def test_hundred_cycles_leave_the_original_in_place():
    original = PTM.__dict__["from_pretrained"]
    for _ in range(100):
        panovlm_flashpatch.apply()
        panovlm_flashpatch.apply()
        panovlm_flashpatch.remove()
    assert PTM.__dict__["from_pretrained"] is original


def test_subclasses_get_their_own_cls_after_apply_and_remove(ckpts):
    from panovlm_flashpatch.tiny import lm_config

    cls = type(transformers.AutoModelForCausalLM.from_config(lm_config()))
    panovlm_flashpatch.apply()
    assert type(cls.from_pretrained(ckpts["lm"])) is cls
    panovlm_flashpatch.remove()
    assert type(cls.from_pretrained(ckpts["lm"])) is cls


def test_wrapper_runs_once_per_load_after_repeated_apply(ckpts):
    panovlm_flashpatch.apply()
    panovlm_flashpatch.apply()
    transformers.AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert len(panovlm_flashpatch.report()) == 1


def test_remove_under_a_foreign_wrapper_keeps_it_and_passes_through(ckpts, caplog):
    original = PTM.__dict__["from_pretrained"]
    panovlm_flashpatch.apply()
    calls = []

    def foreign(wrapped, instance, args, kwargs):
        calls.append(instance)
        return wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(PTM, "from_pretrained", foreign)
    try:
        with caplog.at_level(logging.WARNING, logger="panovlm_flashpatch"):
            assert panovlm_flashpatch.remove()
        assert "wrapped again" in caplog.text
        transformers.AutoModelForCausalLM.from_pretrained(ckpts["lm"])
        assert len(calls) == 1 and panovlm_flashpatch.report() == []
    finally:
        setattr(PTM, "from_pretrained", original)
        patch_module._State.installed = patch_module._State.original = None
        patch_module._State.active = True


def test_importing_the_package_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = "import sys, panovlm_flashpatch; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
