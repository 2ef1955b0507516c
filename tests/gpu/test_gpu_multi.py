"""The plugin under torchrun with DDP and FSDP on real GPUs (issue 7), through benchmarks/multi_gpu_train.py.

Needs the package pip-installed (its start-up hook activates the plugin in every rank; the training
script never imports it before loading) and flash-attn. The two-rank tests need 2 GPUs and skip
elsewhere; the one-rank test runs the same script on a single GPU (DDP and FSDP of world size 1).
NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the GPU machines require.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from panovlm_flashpatch import tiny

from gpu.conftest import skip_without_fa2

pytestmark = pytest.mark.gpu
skip_without_fa2()

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "multi_gpu_train.py")
GPUS = torch.cuda.device_count()
SHAPE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
             num_hidden_layers=4, vocab_size=4096)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.build_lm(str(tmp_path_factory.mktemp("multi") / "lm"), **SHAPE)


def torchrun(world):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def accelerate(world):
    return [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes",
            str(world), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(ckpt, out, wrapper, world, padding_free=False, steps=12, extra=(), env_extra=None, launcher=torchrun):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PANOVLM_FLASHPATCH", "DISABLE_FLASH_ATTN"))}
    env.update(HF_HUB_OFFLINE="1", NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="4", **(env_extra or {}))
    if padding_free:
        env["PANOVLM_FLASHPATCH_PADDING_FREE"] = "1"
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([*launcher(world), SCRIPT, ckpt, str(out), wrapper, "--steps", str(steps), *extra],
                          capture_output=True, text=True, env=env, timeout=600, cwd="/tmp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return ranks, done.stdout + done.stderr


def check_ranks(ranks, log, padding_free):
    for r in ranks:
        assert r["applied"], "automatic activation in every rank"
        (record,) = r["report"]
        assert (record["backend"], record["dtype"]) == ("flash_attention_2", "bfloat16"), record
        assert (record["padding_free"] or "").startswith("padding-free on") == padding_free
    assert [r["device"] for r in ranks] == list(range(len(ranks)))  # each rank on its own GPU
    assert log.count("[panovlm_flashpatch] language model") == 1, "INFO from local rank 0 only"
    assert "ranks disagree" not in log


def run_both(ckpt, tmp_path, world, padding_free):
    results = {}
    for wrapper in ("ddp", "fsdp"):
        ranks, log = launch(ckpt, tmp_path / f"{wrapper}-{padding_free}", wrapper, world, padding_free)
        check_ranks(ranks, log, padding_free)
        results[wrapper] = ranks
    ddp, fsdp = results["ddp"][0]["losses"], results["fsdp"][0]["losses"]
    # Same weights, same data: the first step agrees to bf16 rounding, later ones drift a little.
    assert abs(ddp[0] - fsdp[0]) <= 1e-2 * abs(ddp[0]), (ddp[0], fsdp[0])
    assert all(abs(a - b) <= 3e-2 * abs(a) for a, b in zip(ddp[:5], fsdp[:5])), (ddp[:5], fsdp[:5])
    return results


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_one_gpu_ddp_and_fsdp_of_world_size_one(ckpt, tmp_path, padding_free):
    run_both(ckpt, tmp_path, 1, padding_free)


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 GPUs, found {GPUS}")
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_two_gpus_ddp_and_fsdp(ckpt, tmp_path, padding_free):
    results = run_both(ckpt, tmp_path, 2, padding_free)
    for ranks in results.values():
        assert ranks[0]["losses"] == ranks[1]["losses"]  # the all-reduced mean, identical on both ranks


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 GPUs, found {GPUS}")
def test_two_gpus_through_accelerate_launch(ckpt, tmp_path):
    ranks, log = launch(ckpt, tmp_path / "acc", "ddp", 2, padding_free=True, launcher=accelerate)
    check_ranks(ranks, log, padding_free=True)


def test_a_rank_with_broken_flash_attn_is_named(ckpt, tmp_path):
    """Two ranks (gloo, so they may share one GPU); rank 1's flash-attn extension fails to import."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "flash_attn_2_cuda.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10 (simulated)')\n")
    ranks, log = launch(ckpt, tmp_path / "out", "ddp", 2, extra=("--load-only", "--backend", "gloo"),
                        env_extra={"MULTI_GPU_TEST_BROKEN_RANK": "1", "MULTI_GPU_TEST_SHADOW": str(shadow)})
    assert [r["report"][0]["backend"] for r in ranks] == ["flash_attention_2", "sdpa"]
    warnings = [line for line in log.splitlines() if "ranks disagree" in line]
    assert warnings, log[-3000:]
    assert any("flash_attention_2/bfloat16 on rank 0" in w and "on rank 1 (" in w and "fails to import" in w
               for w in warnings) or any("on rank 1" in w and "flash_attention_2/bfloat16 on rank 0 (" in w for w in warnings), warnings
