"""Multi-process runs on CPU: torchrun and accelerate launch with 2 processes.

The training script does not import the plugin before loading: automatic activation (the .pth
of this editable install) patches every rank. Every rank reaches the same decision, and only
local rank 0 logs at INFO. When ranks end on different backends (here: rank 1's caller asks for
eager), the cross-rank check (ranks.py) warns and names the ranks, whether the process group was
set up before the load or after it (Lightning's order).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    mode = sys.argv[3] if len(sys.argv) > 3 else "same"
    attn = "eager" if mode.startswith("rank1-eager") and os.environ["RANK"] == "1" else "sdpa"
    if mode.endswith("load-first"):  # Lightning's order: models built before the process group
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation=attn)
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo")
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation=attn)
    import panovlm_flashpatch  # only to read the report; activation happened without it
    decisions = [None] * dist.get_world_size()
    mine = [(r["component"], r["decision"], r["backend"], r["dtype"]) for r in panovlm_flashpatch.report(model)]
    dist.all_gather_object(decisions, mine)
    with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"applied": panovlm_flashpatch.is_applied(), "local_rank": os.environ["LOCAL_RANK"],
                   "mine": mine, "all": decisions}, f)
    dist.barrier()
    # Leave without C++ teardown: torch 2.13's gloo threads sometimes abort at interpreter exit
    # ("terminate called without an active exception", seen once in CI), after all work is done.
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
    """
)


def _activation_installed() -> bool:
    import sysconfig

    return os.path.isfile(os.path.join(sysconfig.get_paths()["purelib"], "panovlm_flashpatch.pth"))


pytestmark = pytest.mark.skipif(not _activation_installed(), reason="needs this package pip-installed (its .pth)")


def launchers():
    yield "torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate:
        # --multi_gpu is accelerate's multi-process mode; on a CPU machine its ranks run on CPU.
        yield "accelerate", [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.parametrize("name, command", list(launchers()), ids=[n for n, _ in launchers()])
def test_two_ranks_same_decision_one_info_line(tmp_path, ckpts, name, command):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PANOVLM_FLASHPATCH", "DISABLE_FLASH_ATTN", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([*command, str(script), ckpts["lm"], str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["applied"] for r in ranks)
    assert [r["local_rank"] for r in ranks] == ["0", "1"]
    assert ranks[0]["all"][0] == ranks[0]["all"][1] == ranks[0]["mine"] == ranks[1]["mine"]
    lines = (done.stdout + done.stderr).count("[panovlm_flashpatch] language model")
    assert lines == 1, done.stderr[-3000:]
    assert "ranks disagree" not in done.stderr


@pytest.mark.parametrize("order", ["init-first", "load-first"])
def test_ranks_on_different_backends_are_named(tmp_path, ckpts, order):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PANOVLM_FLASHPATCH", "DISABLE_FLASH_ATTN", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = next(c for n, c in launchers() if n == "torchrun")
    done = subprocess.run([*command, str(script), ckpts["lm"], str(tmp_path), f"rank1-eager-{order}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "ranks disagree" in line]
    assert warnings, done.stderr[-3000:]
    # Named with the ranks and the odd one's reason; whichever rank finished last saw both.
    assert any("sdpa/float32 on rank 0" in w and "eager/float32 on rank 1 (caller chose 'eager'" in w for w in warnings) or \
        any("eager/float32 on rank 1" in w and "sdpa/float32 on rank 0 (" in w for w in warnings), warnings

