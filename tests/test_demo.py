"""README's main job: the demo runs on this transformers and prints the per-component report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_demo_runs_and_reports_every_component():
    # Fault: on transformers 4.57 the demo failed (Siglip2VisionTransformer.forward() missing 2 arguments).
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--json"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    roles = {r["role"] for r in records}
    assert {"language model", "vision encoder"} <= roles
    assert all(r["backend"] and r["reason"] for r in records)
