"""Per-GPU training throughput under torchrun, DDP and FSDP, padded and padding-free (issue 7).

    python benchmarks/multi_gpu_bench.py --gpus 2 [--steps 20] [--out benchmarks/results/multi_gpu]

Runs benchmarks/multi_gpu_train.py on the Qwen3-0.6B-shaped checkpoint of bench.py (workload (a): 8
right-padded sequences of 128..1024 tokens per GPU per step) for each wrapping (DDP, FSDP2) with
padding-free off and on, the plugin activated automatically in every rank. Writes results.md and
results.json: per-GPU real-token throughput (median step after 3 warm-up steps), peak memory, the
decision on every rank, and the loss of the first steps (DDP vs FSDP).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--root", default="/tmp/panovlm_bench_ckpts")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "multi_gpu"))
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    import bench
    import torch
    import transformers

    ckpt = bench.make_checkpoints(args.root)["lm"]
    rows = []
    for padding_free in (False, True):
        for wrapper in ("ddp", "fsdp"):
            out = tempfile.mkdtemp()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PANOVLM_FLASHPATCH", "DISABLE_FLASH_ATTN"))}
            env.update(HF_HUB_OFFLINE="1", NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="4")
            if padding_free:
                env["PANOVLM_FLASHPATCH_PADDING_FREE"] = "1"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
                       os.path.join(HERE, "multi_gpu_train.py"), ckpt, out, wrapper, "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/tmp")
            if done.returncode != 0:
                raise SystemExit(f"{wrapper} padding_free={padding_free} failed:\n{done.stderr[-4000:]}")
            ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(args.gpus)]
            rows.append({"wrapper": wrapper, "padding_free": padding_free, "ranks": ranks,
                         "warnings": [l for l in done.stderr.splitlines() if "ranks disagree" in l]})
            print(f"{wrapper} padding_free={padding_free}: " + ", ".join(
                f"rank {r['rank']} {r['tokens_per_second']:.0f} tok/s {r['peak_gib']:.1f} GiB" for r in ranks), flush=True)
    env_line = (f"{args.gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, transformers {transformers.__version__}, "
                f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    lines = [f"Command: `python benchmarks/multi_gpu_bench.py --gpus {args.gpus} --steps {args.steps}`", "", env_line, "",
             "| wrapping | padding-free | backend, dtype (every rank) | tokens/s per GPU (each rank) | vs padded, same wrapping | peak GiB per GPU | loss, steps 1-3 (mean over ranks) |",
             "|---|---|---|---|---|---|---|"]
    padded = {r["wrapper"]: r for r in rows if not r["padding_free"]}
    for r in rows:
        got = sorted({f"{x['report'][0]['backend']}, {x['report'][0]['dtype']}" for x in r["ranks"]})
        per_gpu = [x["tokens_per_second"] for x in r["ranks"]]
        base = [x["tokens_per_second"] for x in padded[r["wrapper"]]["ranks"]]
        ratio = sum(per_gpu) / sum(base)
        lines.append(f"| {r['wrapper']} | {'on' if r['padding_free'] else 'off'} | {'; '.join(got)} | "
                     f"{', '.join(f'{t:.0f}' for t in per_gpu)} | {ratio:.3f} | {max(x['peak_gib'] for x in r['ranks']):.1f} | "
                     f"{', '.join(f'{l:.4f}' for l in r['ranks'][0]['losses'][:3])} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": env_line, "rows": rows}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
