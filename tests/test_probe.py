"""The real probe against fake installations of flash-attn (in a subprocess, so nothing leaks):
an installed-but-broken build counts as absent with its error as the reason; an old one is named."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import json
    from panovlm_flashpatch import probe
    caps = probe.probe()
    print(json.dumps({"version": caps.flash_attn_version, "error": caps.flash_attn_error,
                      "blockers": list(caps.fa2_blockers())}))
    """
)


def fake_flash_attn(root, version: str, extension_source: str):
    """A flash_attn distribution on a path folder: metadata, the package, the compiled extension."""
    dist = root / f"flash_attn-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flash_attn\nVersion: {version}\n")
    (root / "flash_attn").mkdir()
    (root / "flash_attn" / "__init__.py").write_text(f"__version__ = '{version}'\nimport flash_attn_2_cuda\n")
    (root / "flash_attn_2_cuda.py").write_text(extension_source)


def run_probe(path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("raise ImportError('/site/flash_attn_2_cuda.so: undefined symbol: _ZN3c1017SymInt')\n", "ImportError: /site/flash_attn_2_cuda.so: undefined symbol"),
        ("raise OSError('libcudart.so.12: cannot open shared object file')\n", "OSError: libcudart.so.12"),
    ],
)
def test_installed_but_broken_extension_counts_as_absent(tmp_path, source, expected):
    fake_flash_attn(tmp_path, "2.8.3", source)
    result = run_probe(tmp_path)
    assert result["version"] == "2.8.3"
    assert "is installed but its CUDA extension fails to import" in result["error"] and expected in result["error"]
    assert result["error"] in result["blockers"]


def test_an_old_flash_attn_is_named_with_its_version(tmp_path):
    fake_flash_attn(tmp_path, "2.1.0", "def fwd(*a, **k):\n    raise RuntimeError('not here')\n")
    result = run_probe(tmp_path)
    assert result["error"] is None
    assert "needs flash-attn >= 2.3.3, found 2.1.0" in result["blockers"]


def test_absent_flash_attn():
    from panovlm_flashpatch import probe

    probe.cache_clear()
    caps = probe.probe()
    assert caps.flash_attn_version is None and caps.flash_attn_error == "flash-attn is not installed"
    assert not caps.cuda_available and "needs a CUDA GPU, found none visible to torch" in caps.fa2_blockers()
