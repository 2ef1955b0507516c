"""Zero-code activation: a built wheel (and an editable install) in a fresh virtual environment
patches an unmodified transformers script, with nothing heavy imported at interpreter start.

The fresh environments reuse this environment's torch and transformers through a path file, so
only our package is installed into them (from the wheel built here, never downloaded).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_SCRIPT = textwrap.dedent(
    """
    import sys
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="sdpa")
    entry = transformers.PreTrainedModel.__dict__["from_pretrained"]
    print("backend", model.config._attn_implementation, "dtype", str(model.dtype))
    print("wrapped", type(entry).__name__)
    """
)


def _site_packages(env_dir: str) -> str:
    return sysconfig.get_paths(vars={"base": env_dir, "platbase": env_dir})["purelib"]


def _fresh_env(path) -> tuple[str, str]:
    """A new virtual environment (no pip) that sees this environment's packages *after* its own."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(str(path))
    site_dir = _site_packages(str(path))
    os.makedirs(site_dir, exist_ok=True)
    outer = sysconfig.get_paths()["purelib"]
    # Only a path line: .pth files in the outer folder (our own editable install's) are not run.
    with open(os.path.join(site_dir, "_outer_site.pth"), "w") as f:
        f.write(outer + "\n")
    python = os.path.join(str(path), "bin", "python")
    return python, site_dir


def _pip(*args):
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), ROOT)
    (built,) = [p for p in out.iterdir() if p.suffix == ".whl"]
    return str(built)


@pytest.fixture(scope="session")
def wheel_env(tmp_path_factory, wheel):
    python, site_dir = _fresh_env(tmp_path_factory.mktemp("wheel_env") / "env")
    _pip("install", "--no-deps", "--no-index", "--target", site_dir, wheel)
    assert os.path.isfile(os.path.join(site_dir, "panovlm_flashpatch.pth"))
    return python


@pytest.fixture(scope="session")
def editable_env(tmp_path_factory):
    python, site_dir = _fresh_env(tmp_path_factory.mktemp("editable_env") / "env")
    done = subprocess.run(
        [python, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "-e", ROOT],
        capture_output=True, text=True,
    )
    if done.returncode != 0:  # pip lives in the outer environment: run it for this interpreter
        pytest.fail(done.stdout + done.stderr)
    assert os.path.isfile(os.path.join(site_dir, "panovlm_flashpatch.pth"))
    return python


@pytest.fixture(scope="session")
def user_script(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    script = folder / "train.py"
    script.write_text(USER_SCRIPT)
    return str(script)


def run(python, *args, env=None, cwd=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PANOVLM_FLASHPATCH", "DISABLE_FLASH_ATTN", "PYTHONPATH"))}
    environ.update(env or {})
    environ["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([python, *args], capture_output=True, text=True, env=environ, cwd=cwd or "/")


@pytest.mark.parametrize("env_name", ["wheel_env", "editable_env"])
def test_unmodified_script_is_patched(request, env_name, user_script, ckpts):
    python = request.getfixturevalue(env_name)
    done = run(python, user_script, ckpts["lm"])
    assert done.returncode == 0, done.stderr
    assert "wrapped FunctionWrapper" in done.stdout
    assert "[panovlm_flashpatch] language model" in done.stderr
    assert "backend sdpa dtype torch.float32" in done.stdout  # CPU: FA2 cannot run, SDPA kept


@pytest.mark.parametrize("env", [{"DISABLE_FLASH_ATTN": "1"}, {"PANOVLM_FLASHPATCH_AUTO": "0"}])
def test_off_switches_leave_transformers_unpatched(wheel_env, user_script, ckpts, env):
    done = run(wheel_env, user_script, ckpts["lm"], env=env)
    assert done.returncode == 0, done.stderr
    assert "wrapped classmethod" in done.stdout and "panovlm_flashpatch" not in done.stderr


def test_explicit_apply_works_with_automatic_activation_off(wheel_env, tmp_path, ckpts):
    script = tmp_path / "explicit.py"
    script.write_text("import panovlm_flashpatch\nassert panovlm_flashpatch.apply()\n" + USER_SCRIPT)
    done = run(wheel_env, str(script), ckpts["lm"], env={"PANOVLM_FLASHPATCH_AUTO": "0"})
    assert done.returncode == 0, done.stderr
    assert "wrapped FunctionWrapper" in done.stdout


def test_remove_before_transformers_is_imported_cancels_automatic_activation(wheel_env, tmp_path, ckpts):
    script = tmp_path / "opt_out.py"
    script.write_text("import panovlm_flashpatch\nassert panovlm_flashpatch.remove()\n" + USER_SCRIPT)
    done = run(wheel_env, str(script), ckpts["lm"])
    assert done.returncode == 0, done.stderr
    assert "wrapped classmethod" in done.stdout and "panovlm_flashpatch" not in done.stderr


def test_explicit_apply_after_automatic_activation_is_a_no_op(wheel_env, tmp_path, ckpts):
    script = tmp_path / "twice.py"
    script.write_text(
        USER_SCRIPT
        + "import panovlm_flashpatch\nassert panovlm_flashpatch.apply()\n"
        + "assert transformers.PreTrainedModel.__dict__['from_pretrained'] is entry\n"
        + "print('layers', type(entry.__wrapped__).__name__)\n"
    )
    done = run(wheel_env, str(script), ckpts["lm"])
    assert done.returncode == 0, done.stderr
    assert "layers classmethod" in done.stdout


def test_entry_point_group_names_the_hook(wheel_env):
    code = (
        "from importlib.metadata import entry_points\n"
        "(ep,) = entry_points(group='panovlm_flashpatch')\n"
        "print(ep.name, ep.value)\n"
    )
    done = run(wheel_env, "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["transformers.modeling_utils", "panovlm_flashpatch._bootstrap:on_transformers_import"]


def test_interpreter_start_imports_nothing_heavy(wheel_env):
    code = "import sys; print(sorted(m for m in ('torch', 'transformers', 'wrapt', 'logging', 'panovlm_flashpatch.patch') if m in sys.modules))"
    done = run(wheel_env, "-c", code)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    done = run(wheel_env, "-c", "import sys; print('panovlm_flashpatch._bootstrap' in sys.modules)")
    assert done.stdout.strip() == "True"  # the start-up line did run


def test_a_failure_inside_the_hook_is_a_warning_not_a_crash(wheel_env, user_script, ckpts, tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "wrapt.py").write_text("raise ImportError('wrapt is broken here')\n")
    done = run(wheel_env, user_script, ckpts["lm"], env={"PYTHONPATH": str(shadow)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("automatic activation failed") == 1 and "wrapt is broken here" in done.stderr
    assert "wrapped classmethod" in done.stdout


def test_hook_registered_after_transformers_was_imported_applies_at_once(wheel_env):
    code = (
        "import transformers.modeling_utils as mu\n"
        "import panovlm_flashpatch._bootstrap as b\n"
        "print(type(mu.PreTrainedModel.__dict__['from_pretrained']).__name__)\n"
    )
    # AUTO=0 keeps the start-up line from registering; then transformers is imported first and
    # install() is called late (as a sitecustomize or a framework would): it applies at once.
    done = run(wheel_env, "-c", code.replace("print", "import os; os.environ.pop('PANOVLM_FLASHPATCH_AUTO'); b.install(); print"),
               env={"PANOVLM_FLASHPATCH_AUTO": "0"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "FunctionWrapper"


# --- issue 12: start-up must never be the reason a program fails ------------------------------------------


def test_options_given_before_transformers_is_imported_survive_automatic_activation(wheel_env, tmp_path, ckpts):
    # Fault: the start-up hook's own apply() re-entered and reset apply(padding_free=True) to off.
    script = tmp_path / "options_first.py"
    script.write_text(
        "import sys, panovlm_flashpatch\n"
        "assert panovlm_flashpatch.apply(padding_free=True)\n"
        "from transformers import AutoModelForCausalLM\n"
        "from panovlm_flashpatch.runtime import padding_free\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print('armed', padding_free.is_armed(model))\n"
    )
    done = run(wheel_env, str(script), ckpts["lm"])
    assert done.returncode == 0, done.stderr
    assert "armed True" in done.stdout


def test_an_empty_auto_variable_means_not_set(wheel_env, user_script, ckpts):
    # Fault: PANOVLM_FLASHPATCH_AUTO= (empty) silently turned automatic activation off.
    done = run(wheel_env, user_script, ckpts["lm"], env={"PANOVLM_FLASHPATCH_AUTO": ""})
    assert done.returncode == 0, done.stderr
    assert "wrapped FunctionWrapper" in done.stdout and "not understood" not in done.stderr


def test_a_stale_editable_install_prints_nothing_at_start_up(tmp_path):
    # Fault: with the source tree deleted, every Python start printed a traceback from panovlm_flashpatch.pth.
    import shutil

    source = tmp_path / "checkout"
    source.mkdir()
    for name in ("panovlm_flashpatch", "pyproject.toml", "README.md", "panovlm_flashpatch.pth"):
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
        copy(os.path.join(ROOT, name), source / name)
    python, site_dir = _fresh_env(tmp_path / "env")
    done = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                           "--no-build-isolation", "--no-index", "-e", str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert run(python, "-c", "import sys; print('panovlm_flashpatch._bootstrap' in sys.modules)").stdout.strip() == "True"
    shutil.rmtree(source)
    done = run(python, "-c", "print('started')")
    assert done.returncode == 0 and done.stdout.strip() == "started"
    assert "panovlm_flashpatch" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_applications_logging_level_decides(wheel_env, tmp_path, ckpts):
    # Fault: after logging.basicConfig(level=logging.WARNING) the plugin's INFO lines still printed.
    for level, shown in (("WARNING", False), ("INFO", True)):
        script = tmp_path / f"logging_{level}.py"
        script.write_text(f"import logging\nlogging.basicConfig(level=logging.{level})\n" + USER_SCRIPT)
        done = run(wheel_env, str(script), ckpts["lm"])
        assert done.returncode == 0, done.stderr
        assert ("INFO:panovlm_flashpatch:language model" in done.stderr) is shown, done.stderr
        assert "[panovlm_flashpatch]" not in done.stderr  # the application's format, never ours on top


BROKEN_CUDA_BOX = (
    "import torch\n"
    "torch.cuda.is_available = lambda: True  # a GPU machine whose flash-attn build no longer matches torch\n"
    "torch.version.cuda = '12.4'\n"
)


def test_a_broken_flash_attn_build_does_not_break_model_imports(wheel_env, tmp_path, ckpts):
    # Fault (transformers <= 4.53): importing any model module raised "Failed to import
    # transformers.models.qwen2.modeling_qwen2 ... undefined symbol" once flash-attn's metadata was there.
    from test_probe import fake_flash_attn

    fake = tmp_path / "site"
    fake.mkdir()
    fake_flash_attn(fake, "2.8.3", "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')\n")
    script = tmp_path / "broken_box.py"
    script.write_text(BROKEN_CUDA_BOX + USER_SCRIPT)
    env = {"PYTHONPATH": str(fake)}
    done = run(wheel_env, str(script), ckpts["lm"], env=env)
    assert done.returncode == 0, done.stderr
    assert "backend sdpa" in done.stdout and "undefined symbol" in done.stderr
    import transformers

    from panovlm_flashpatch.compat import parse_version

    if parse_version(transformers.__version__)[:2] < (4, 54):
        assert "told flash-attn is unavailable" in done.stderr
        plain = run(wheel_env, str(script), ckpts["lm"], env={**env, "PANOVLM_FLASHPATCH_AUTO": "0"})
        assert plain.returncode != 0 and "undefined symbol" in plain.stderr  # the fault, without the plugin
