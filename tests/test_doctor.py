"""The doctor: one screen, --json, --model dry-run from a local config, a clear exit for a bad path."""

from __future__ import annotations

import json
import subprocess
import sys

from panovlm_flashpatch import doctor


def run(capsys, *argv):
    code = doctor.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_lists_the_environment(capsys):
    code, out, _ = run(capsys, "--json")
    info = json.loads(out)
    assert code == 0
    for key in ("python.version", "torch.version", "transformers.version", "wrapt.version", "flash_attn.status",
                "cuda.available", "flash_attention_2.usable", "activation.installed", "env.DISABLE_FLASH_ATTN"):
        assert key in info
    # This machine: no GPU, no flash-attn, and the doctor says why.
    assert info["flash_attention_2.usable"] is False
    assert "flash-attn is not installed" in info["flash_attention_2.reasons"]


def test_text_is_one_line_per_key(capsys):
    code, out, _ = run(capsys)
    assert code == 0
    assert any(line.startswith("flash_attn.status") and "not installed" in line for line in out.splitlines())


def test_model_dry_run_reads_only_the_config(capsys, ckpts):
    name = "llava_siglip2" if "llava_siglip2" in ckpts else "llava_siglip"
    code, out, _ = run(capsys, "--model", ckpts[name], "--json")
    info = json.loads(out)
    assert code == 0 and info["model.class"] == "LlavaForConditionalGeneration"
    assert info["model.text_config.role"] == "language model"
    assert info["model.vision_config.role"] == "vision encoder"
    assert "needs a CUDA GPU" in info["model.text_config.reason"]


def test_a_path_that_is_not_a_checkpoint_fails_clearly(capsys, tmp_path):
    code, out, err = run(capsys, "--model", str(tmp_path))
    assert code == 2 and out == ""
    assert "no config.json" in err and "never downloads" in err


def test_unknown_variable_values_are_flagged(capsys, monkeypatch):
    monkeypatch.setenv("PANOVLM_FLASHPATCH_KEEP_SDPA", "sometimes")
    code, out, _ = run(capsys, "--json")
    problems = json.loads(out)["env.problems"]
    assert code == 0 and any("PANOVLM_FLASHPATCH_KEEP_SDPA='sometimes'" in p for p in problems)


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "panovlm_flashpatch", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["panovlm_flashpatch.version"]


def test_the_dry_run_names_the_off_switch(capsys, ckpts, monkeypatch):
    # Fault: under DISABLE_FLASH_ATTN=1 the --model reason said "needs a CUDA GPU", not that the plugin was off.
    monkeypatch.setenv("DISABLE_FLASH_ATTN", "1")
    code, out, _ = run(capsys, "--model", ckpts["lm"], "--json")
    info = json.loads(out)
    assert code == 0 and "DISABLE_FLASH_ATTN=1: the plugin is off" in info["model.reason"]


def test_the_dry_run_uses_the_loaders_planner(capsys, ckpts):
    code, out, _ = run(capsys, "--model", ckpts["lm"], "--dtype", "float32", "--json")
    info = json.loads(out)
    assert code == 0 and info["model.model.dtype"] == "float32" and info["model.model.role"] == "language model"


def test_a_non_ascii_path_on_an_ascii_terminal(tmp_path, ckpts):
    # Fault: UnicodeEncodeError and exit 1 (documented exit codes: 0 and 2).
    import shutil

    path = tmp_path / "modèle-中文"
    shutil.copytree(ckpts["lm"], path)
    env = {**__import__("os").environ, "PYTHONIOENCODING": "ascii", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "panovlm_flashpatch", "--model", str(path)], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "mod\\xe8le-\\u4e2d\\u6587" in done.stdout and "Traceback" not in done.stderr
    missing = subprocess.run([sys.executable, "-m", "panovlm_flashpatch", "--model", str(tmp_path / "ça")],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_an_unreadable_config_is_exit_2(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    code, out, err = run(capsys, "--model", str(tmp_path))
    assert code == 2 and "cannot be read" in err


def test_dtype_names_are_read_as_from_pretrained_takes_them(capsys, ckpts):
    # Fault: --dtype torch.bfloat16 / bf16 / int8 were all accepted and gave a contradictory reason.
    for given in ("bf16", "torch.bfloat16", "bfloat16"):
        code, out, _ = run(capsys, "--model", ckpts["lm"], "--dtype", given, "--json")
        assert code == 0 and "found dtype" not in json.loads(out)["model.model.reason"], given
    code, out, err = run(capsys, "--model", ckpts["lm"], "--dtype", "int8")
    assert code == 2 and "not a floating-point dtype" in err
