"""Runs every benchmark configuration side by side and writes the results.

    python benchmarks/run.py [--repeats 3] [--workloads train,generate,vision,load] [--out benchmarks/results]

Each (workload, mode) runs in its own process (bench.py), repeated and interleaved (plain, plugin,
plain, ...) so that drift of the machine hits both alike; the table reports medians over repeats and
the ratio of the plugin's throughput to plain transformers' (>= 1.0: the plugin is not slower).
Writes results.md, results.json and results.png (small files) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = {"train": ("plain", "plugin", "packed", "loss_only"), "train512": ("plain", "packed"), "train64": ("plain", "packed"),
         "train16": ("plain", "packed"),
         "generate": ("plain", "plugin"), "vision": ("plain", "plugin"), "load": ("plain", "plugin", "retry")}
TITLES = {
    "train": "(a) Qwen3-0.6B-shaped LM, fwd+bwd, batch 8 right-padded 128..1024",
    "train512": "(a2) the same, lengths 512..1024",
    "train64": "(a3) the same, lengths 64..1024",
    "train16": "(a4) the same lengths, batch 16",
    "generate": "(b) generation, 8 left-padded prompts 256..512, 128 new tokens, greedy",
    "vision": "(c) SigLIP-base vision tower, fwd+bwd, batch 64 at 224 px",
    "load": "(d) from_pretrained to GPU, Qwen3-0.6B-shaped (retry: one refused FA2 attempt)",
}


def environment() -> dict:
    import torch
    import transformers

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    for dist in ("flash_attn", "panovlm_flashpatch"):
        try:
            import importlib.metadata as md

            env[dist] = md.version(dist)
        except Exception:
            env[dist] = None
    return env


def run_one(workload: str, mode: str, root: str) -> dict:
    # Automatic activation (an installed wheel's .pth) must not touch the "plain" arm; the plugin arm
    # calls apply() itself.
    env = {**os.environ, "PANOVLM_FLASHPATCH_AUTO": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("DISABLE_FLASH_ATTN", None)
    done = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), workload, mode, root],
                          capture_output=True, text=True, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{workload}/{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def summarize(runs: dict) -> list[dict]:
    rows = []
    for workload, by_mode in runs.items():
        for mode, results in by_mode.items():
            per_second = statistics.median(r["per_second"] for r in results)
            # Repeat i of every mode ran back to back (interleaved), so each pair shares the machine's
            # state at that moment; the headline is the median of these pair ratios.
            ratios = [r["per_second"] / p["per_second"] for r, p in zip(results, by_mode["plain"])]
            memory = [r["peak_gib"] / p["peak_gib"] for r, p in zip(results, by_mode["plain"])]
            rows.append({
                "workload": workload, "mode": mode, "backend": results[0]["backend"], "dtype": results[0]["dtype"],
                "phases": results[0].get("phases", {}), "seconds": statistics.median(r["seconds"] for r in results),
                "per_second": per_second, "unit": results[0]["unit"],
                "peak_gib": statistics.median(r["peak_gib"] for r in results),
                "overhead_ms": statistics.median(r["overhead_ms"] for r in results) if "overhead_ms" in results[0] else None,
                "ratio": statistics.median(ratios), "ratio_pairs": [round(x, 3) for x in ratios], "repeats": len(results),
                "memory_ratio": statistics.median(memory),
                "real_share": (results[0]["real_tokens"] / results[0]["padded_tokens"]) if "real_tokens" in results[0] else None,
            })
    return rows


def markdown(rows: list[dict], env: dict, command: str) -> str:
    out = ["| workload | mode | backend | dtype | time (s) | throughput | peak GiB (ratio to plain) | plugin's own time per load (ms) | ratio to plain: median of pairs (each pair) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        backend = r["backend"] + (f" ({', '.join(f'{k}: {v}' for k, v in r['phases'].items())})" if r["phases"] else "")
        share = f" ({r['real_share']:.0%} real tokens)" if r.get("real_share") else ""
        out.append(f"| {TITLES[r['workload']]}{share} | {r['mode']} | {backend} | {r['dtype']} | {r['seconds']:.4f} | "
                   f"{r['per_second']:.1f} {r['unit']} | {r['peak_gib']:.2f} ({r.get('memory_ratio', 1.0):.2f}) | {'-' if r.get('overhead_ms') is None else format(r['overhead_ms'], '.2f')} | {r['ratio']:.3f} ({', '.join(map(str, r['ratio_pairs']))}) |")
    env_line = ", ".join(f"{k} {v}" for k, v in env.items())
    return f"Command: `{command}`\n\nEnvironment: {env_line}\n\n" + "\n".join(out) + "\n"


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["mode"] != "plain"]
    fig, ax = plt.subplots(figsize=(7, 2.8), dpi=80)
    labels = [f"{r['workload']} ({r['mode']})" for r in shown]
    ax.barh(labels, [r["ratio"] for r in shown], color=["#4c72b0" if r["ratio"] >= 0.98 else "#c44e52" for r in shown])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(0.98, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("throughput relative to plain transformers (SDPA)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="train,generate,vision,load")
    parser.add_argument("--modes", default=None, help="only these modes of each workload, e.g. plain,plugin")
    parser.add_argument("--root", default="/tmp/panovlm_bench_ckpts")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                        help="only rebuild results.md/png from results.json files of earlier runs (one table)")
    args = parser.parse_args()
    if args.merge:
        parts = [json.load(open(p)) for p in args.merge]
        rows = [row for part in parts for row in summarize(part["runs"])]
        commands = "; ".join(p["command"] for p in parts)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"environment": parts[0]["environment"], "command": commands, "rows": rows,
                       "runs": {k: v for p in parts for k, v in p["runs"].items()}}, f, indent=1)
        text = markdown(rows, parts[0]["environment"], commands)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
        chart(rows, os.path.join(args.out, "results.png"))
        print(text)
        return 0
    workloads = args.workloads.split(",")
    sys.path.insert(0, HERE)
    import bench

    bench.make_checkpoints(args.root)
    wanted = args.modes.split(",") if args.modes else None
    chosen = {w: tuple(m for m in MODES[w] if wanted is None or m in wanted) for w in workloads}
    runs = {w: {m: [] for m in chosen[w]} for w in workloads}
    for repeat in range(args.repeats):
        for workload in workloads:
            modes = chosen[workload] if repeat % 2 == 0 else tuple(reversed(chosen[workload]))
            for mode in modes:
                result = run_one(workload, mode, args.root)
                runs[workload][mode].append(result)
                print(f"[{repeat}] {workload:9s} {mode:7s} {result['backend']:18s} {result['per_second']:9.1f} {result['unit']}",
                      flush=True)
    # Pairs for per-pair ratios must line up by repeat: keep the order they were appended in.
    rows = summarize(runs)
    env = environment()
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": env, "command": command, "rows": rows, "runs": runs}, f, indent=1)
    text = markdown(rows, env, command)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    chart(rows, os.path.join(args.out, "results.png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
