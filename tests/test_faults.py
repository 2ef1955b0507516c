"""Fault injection: the faults of docs/faults.md that no other test file covers end to end.

Each test injects one fault and checks what the plugin does, what the user sees, and that nothing
was lost. docs/faults.md lists every fault tried, with the test that tries it; the last test here
keeps that table and the tests in step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest
import transformers
from transformers import AutoModelForCausalLM

import panovlm_flashpatch
from panovlm_flashpatch import compat, tiny
from panovlm_flashpatch.decide import FA2

from conftest import FAKE_GPU, caps, outcome, without_plugin
from test_probe import fake_flash_attn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def only(records, component=""):
    (rec,) = [r for r in records if r["component"] == component]
    return rec


LOAD_IN_SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import panovlm_flashpatch
    panovlm_flashpatch.apply()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="sdpa")
    print(json.dumps(panovlm_flashpatch.report(model)))
    """
)


def load_in_subprocess(path_dir, ckpt) -> tuple[list, str]:
    env = {**os.environ, "PYTHONPATH": str(path_dir), "HF_HUB_OFFLINE": "1", "PANOVLM_FLASHPATCH_AUTO": "0"}
    done = subprocess.run([sys.executable, "-c", LOAD_IN_SUBPROCESS, ckpt], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_fault_broken_flash_attn_extension_end_to_end(tmp_path, ckpts):
    fake_flash_attn(tmp_path, "2.8.3", "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c1017SymInt')\n")
    (rec,), stderr = load_in_subprocess(tmp_path, ckpts["lm"])
    assert rec["backend"] == "sdpa" and len(rec["attempts"]) == 1 and rec["attempts"][0]["error"] is None
    assert "CUDA extension fails to import: ImportError" in rec["reason"] and "undefined symbol" in stderr


_FAKE_KERNELS = """
import os


class _Names(type):
    def __getattr__(cls, name):
        return _Stub


class _Stub(metaclass=_Names):
    # Stands in for every name transformers imports from kernels (classes, decorators, enums).
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) else self

    def __getattr__(self, name):
        return _Stub()


def get_kernel(*args, **kwargs):  # what fetches a kernel from the hub
    open(os.environ["KERNELS_FETCH_LOG"], "a").write(repr(args) + "\\n")
    raise RuntimeError("no network")


def __getattr__(name):
    return _Stub
"""


def test_fault_kernels_installed_without_flash_attn(tmp_path, ckpts, monkeypatch):
    dist = tmp_path / "kernels-0.12.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.12.3\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text(_FAKE_KERNELS)
    fetched = tmp_path / "fetched.log"
    monkeypatch.setenv("KERNELS_FETCH_LOG", str(fetched))
    (rec,), _ = load_in_subprocess(tmp_path, ckpts["lm"])
    # No FlashAttention-2 request at all, so transformers never swaps in (and downloads) a hub kernel.
    assert rec["attempts"] == [{"attn_implementation": "sdpa", "dtype": None, "error": None}]
    assert "flash-attn is not installed" in rec["reason"]
    assert not fetched.exists(), fetched.read_text()


def test_fault_compute_capability_7_5(patched, ckpts, monkeypatch):
    t4 = FAKE_GPU.__class__(0, "Tesla T4", (7, 5), False)
    monkeypatch.setattr(panovlm_flashpatch.probe, "probe", lambda devices=None: caps(devices=(t4,)))
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    rec = only(panovlm_flashpatch.report(model))
    assert len(rec["attempts"]) == 1 and rec["backend"] == "sdpa"
    assert "needs compute capability >= 8.0, found 7.5 on cuda:0 (Tesla T4)" in rec["reason"]


def test_fault_device_map_offloads_to_cpu(capable, ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], device_map="cpu")
    rec = only(panovlm_flashpatch.report(model))
    assert len(rec["attempts"]) == 1 and rec["attempts"][0]["attn_implementation"] is None
    assert "device_map placing modules on cpu" in rec["reason"]


def test_fault_head_dim_over_256(capable, tmp_path):
    overrides = {"head_dim": 288} if tiny.has_qwen3() else {"hidden_size": 576, "num_attention_heads": 2, "num_key_value_heads": 1}
    path = tiny.build_lm(str(tmp_path / "bighead"), **overrides)
    model = AutoModelForCausalLM.from_pretrained(path)
    rec = only(panovlm_flashpatch.report(model))
    assert len(rec["attempts"]) == 1 and "needs head_dim <= 256, found 288" in rec["reason"]


def test_fault_composite_with_one_tower_lacking_fa2(capable, tmp_path, monkeypatch):
    monkeypatch.setenv("PANOVLM_FLASHPATCH_ENCODERS_FA2", "1")  # isolate the class-support reason
    facts = compat.transformers_facts()
    lacking = next(
        (name for name, cls in (("siglip2", getattr(transformers, "Siglip2VisionModel", None)), ("dinov2", transformers.Dinov2Model))
         if cls is not None and not compat.supports_fa2(cls, facts)),
        None,
    )
    if lacking is None:
        pytest.skip(f"every vision tower supports FlashAttention-2 on transformers {facts.version}")
    path = tiny.build_llava(str(tmp_path / "llava"), vision=lacking)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path)
    records = panovlm_flashpatch.report(model)
    first = records[0]["attempts"][0]["attn_implementation"]
    assert first == {"text_config": FA2}, first  # one load: FA2 for the LM, the tower left to transformers
    vision = only(records, "vision_config")
    assert "does not support FlashAttention-2" in vision["reason"] and not vision["retried"]


def test_fault_transformers_outside_the_supported_range(ckpts, monkeypatch, caplog):
    from panovlm_flashpatch import reporting

    reporting.forget_once()
    monkeypatch.setattr(compat, "transformers_facts", lambda: compat.facts_for("4.45.2"))
    monkeypatch.setattr(panovlm_flashpatch.patch, "transformers_facts", lambda: compat.facts_for("4.45.2"))
    original = transformers.PreTrainedModel.__dict__["from_pretrained"]
    with caplog.at_level(logging.WARNING, logger="panovlm_flashpatch"):
        assert panovlm_flashpatch.apply() is False
    assert "transformers 4.45.2 is outside the supported range" in caplog.text and "stands aside" in caplog.text
    assert transformers.PreTrainedModel.__dict__["from_pretrained"] is original
    AutoModelForCausalLM.from_pretrained(ckpts["lm"])
    assert panovlm_flashpatch.report() == []


def test_fault_reused_config_and_kwargs_across_a_retry(capable, ckpts):
    config = transformers.AutoConfig.from_pretrained(ckpts["lm"])
    kwargs = {"config": config}
    before = json.dumps(config.to_dict(), sort_keys=True, default=str)
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(ckpts["lm"], **kwargs)
        assert only(panovlm_flashpatch.report(model))["retried"]
    assert kwargs == {"config": config} and json.dumps(config.to_dict(), sort_keys=True, default=str) == before
    assert config._attn_implementation_internal is None


def test_fault_table_lists_every_fault_with_an_existing_test():
    table = open(os.path.join(ROOT, "docs", "faults.md")).read()
    rows = [line for line in table.splitlines() if re.match(r"^\| \d+ \|", line)]
    sources = "".join(open(os.path.join(d, f)).read() for d, _, files in os.walk(os.path.join(ROOT, "tests"))
                      for f in files if f.endswith(".py"))
    named = re.findall(r"`(test_[a-z0-9_]+)`", table)
    assert len(rows) >= 30 and f"{len(rows)} faults" in table
    missing = [name for name in named if f"def {name}(" not in sources]
    assert not missing, f"docs/faults.md names tests that do not exist: {missing}"
    assert all("`test_" in row for row in rows), "every fault row names the test that tries it"


def test_fault_plugin_bug_passes_the_load_through(capable, ckpts, monkeypatch, caplog):
    from panovlm_flashpatch import _safety
    from panovlm_flashpatch import patch as patch_module

    def broken(*args, **kwargs):
        raise AttributeError("a bug of ours")

    monkeypatch.setattr(patch_module, "plan_call", broken)
    load = lambda: AutoModelForCausalLM.from_pretrained(ckpts["lm"], attn_implementation="sdpa")  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="panovlm_flashpatch"):
        assert outcome(load) == without_plugin(load)
    assert "planning the load of Qwen" in caplog.text and "the load passed through untouched" in caplog.text
    (absorbed,) = _safety.internal_errors
    assert re.fullmatch(r"planning the load of Qwen\d?ForCausalLM: AttributeError: a bug of ours", absorbed)
    _safety.internal_errors.clear()  # expected here; every other test asserts there are none
