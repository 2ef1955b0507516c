"""Training throughput on the workloads users run: dynamic padding, batch 1, and today's fixed batch.

    python benchmarks/workloads.py run --workloads dyn8,dyn16,b1,fixed8 --arms plain,flash_first,fa2,fa2_pf,default \
        --steps 300 --repeats 2 --out DIR [--budget-s 560] [--seed 0] [--root /tmp/panovlm_workloads] [--tiny]
    python benchmarks/workloads.py one WORKLOAD ARM CKPT --steps N --seed S [--tiny]   ->  one JSON line on stdout
    python benchmarks/workloads.py report DIR   ->  DIR/results.json, results.md, results.png from DIR/*.jsonl

WORKLOAD: dyn8 / dyn16 (batch 8 / 16, row lengths U[128, 1024], padded to each batch's longest: a new
width nearly every step), b1 (batch 1, length U[1200, 1600], no padding), fixed8 (batch 8, one batch of
U[128, 1024] rows repeated every step: the fixed-shape benchmark of bench.py). ARM: see ARMS below.
Every (workload, arm, repeat) runs in a fresh process, interleaved, on a random-initialised bf16
Qwen3-0.6B-shaped checkpoint loaded through from_pretrained; every arm sees the same batches (seed
per repeat). Each finished run is appended to DIR/runs.jsonl at once, so a device call that is killed
keeps what it finished; `report` combines every *.jsonl in DIR (several device calls, one table).
--tiny: a 2-layer model, lengths / 16, on the CPU (tests this script, measures nothing).
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LM_SHAPE = dict(  # Qwen3-0.6B
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
    tie_word_embeddings=True, rms_norm_eps=1e-6,
)
TINY_SHAPE = {**LM_SHAPE, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
TINY_SCALE = 16  # --tiny divides every length by this

#: name -> (batch size, shortest, longest, same batch every step)
WORKLOADS = {"dyn8": (8, 128, 1024, False), "dyn16": (16, 128, 1024, False), "b1": (1, 1200, 1600, False),
             "fixed8": (8, 128, 1024, True)}

HIDE_FLASH_ATTN = "PANOVLM_BENCH_HIDE_FLASH_ATTN"
#: name -> environment set before the child starts, apply()'s options (None: the plugin is not applied),
#: liger kernels, gradient checkpointing, the single-row path switched off.
_PLUGIN_OFF = {"DISABLE_FLASH_ATTN": "1"}  # also stops an installed .pth's automatic activation at start-up
ARMS = {
    "plain": dict(env=_PLUGIN_OFF, apply=None),  # transformers as it is
    # torch's SDPA tries its flash kernel before cuDNN (on Hopper cuDNN comes first, and plans every new shape)
    "flash_first": dict(env={**_PLUGIN_OFF, "TORCH_CUDNN_SDPA_DEPRIORITIZED": "1"}, apply=None),
    # The options alone, without the per-phase routing of sdpa_order.py: FlashAttention-2 for every training forward.
    "fa2": dict(env={}, apply={"padding_free": False, "sdpa_flash_first": False}),  # FlashAttention-2, padded
    "fa2_pf": dict(env={}, apply={"padding_free": True, "sdpa_flash_first": False}),
    "default": dict(env={}, apply={}),  # what the plugin ships: the arm the verdict is about
    "default_no_fa": dict(env={HIDE_FLASH_ATTN: "1"}, apply={}),  # the default where flash-attn cannot load
    # padding_free="loss_only": packed, and the loss computed from the hidden states in chunks (runtime/chunked_loss.py)
    "pf_loss_only": dict(env={}, apply={"padding_free": "loss_only"}),
    # the same with liger's RMSNorm, RoPE and SwiGLU kernels, and without its fused linear cross-entropy
    "pf_loss_only_liger": dict(env={}, apply={"padding_free": "loss_only"}, liger="kernels"),
    "pf_liger": dict(env={}, apply={"padding_free": True}, liger=True),
    "pf_liger_gc": dict(env={}, apply={"padding_free": True}, liger=True, gc=True),
    "pf_gc": dict(env={}, apply={"padding_free": True}, gc=True),
}


def _owned(name: str) -> bool:
    """Variables no run may inherit from the caller's environment: only its arm decides them."""
    return name.startswith(("PANOVLM_FLASHPATCH_", "PANOVLM_BENCH_")) or name in ("DISABLE_FLASH_ATTN",
                                                                                  "TORCH_CUDNN_SDPA_DEPRIORITIZED")


def _checked(names: str, valid: dict, what: str) -> list[str]:
    chosen = [n for n in names.split(",") if n]
    unknown = [n for n in chosen if n not in valid]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}: valid {what}s are {', '.join(valid)}")
    return chosen


# ----------------------------------------------------------------------------------------------- one run

def make_checkpoint(root: str, tiny: bool) -> str:
    path = os.path.join(root, "qwen3-tiny" if tiny else "qwen3-0.6b-shaped")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    try:  # an installed plugin (its .pth) must not touch the checkpoint we write
        import panovlm_flashpatch

        panovlm_flashpatch.remove()
    except Exception:
        pass
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**(TINY_SHAPE if tiny else LM_SHAPE)))
    tmp = f"{path}.tmp{os.getpid()}"
    model.to(torch.bfloat16).save_pretrained(tmp)
    os.replace(tmp, path)  # a killed build leaves no half-written checkpoint behind
    return path


def batches(workload: str, vocab: int, seed: int, tiny: bool):
    """Yields (CPU batch, real tokens) forever; the same seed gives every arm the same batches."""
    import torch

    size, low, high, fixed = WORKLOADS[workload]
    if tiny:
        low, high = low // TINY_SCALE, high // TINY_SCALE
    g = torch.Generator().manual_seed(seed)
    batch = None
    while True:
        if batch is None or not fixed:
            lengths = torch.randint(low, high + 1, (size,), generator=g)
            width = int(lengths.max())
            mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # right padding
            ids = torch.randint(0, vocab, (size, width), generator=g).masked_fill(mask == 0, 0)
            batch = ({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)},
                     int(lengths.sum()))
        yield batch


def _version(dist: str) -> str | None:
    return next((d.version for d in importlib.metadata.distributions(name=dist)), None)


def run_one(workload: str, arm: str, ckpt: str, steps: int, seed: int, tiny: bool) -> dict:
    spec = ARMS[arm]
    if spec["env"].get(HIDE_FLASH_ATTN) or os.environ.get(HIDE_FLASH_ATTN) == "1":
        # First, before torch, transformers or the plugin is imported: the plugin's probe then finds
        # flash-attn's extension unimportable, as on a machine where it is missing or broken.
        sys.modules["flash_attn"] = None
        sys.modules["flash_attn_2_cuda"] = None
    # For a direct call of `one`; the orchestrator has done this already (DISABLE_FLASH_ATTN must be
    # there at interpreter start for the .pth, TORCH_CUDNN_SDPA_DEPRIORITIZED before torch's first SDPA).
    for name in [k for k in os.environ if _owned(k) and k not in spec["env"]]:
        del os.environ[name]
    os.environ.update(spec["env"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = {"workload": workload, "arm": arm, "steps": steps, "seed": seed, "env": spec["env"]}
    if spec["apply"] is not None:
        import panovlm_flashpatch

        out["applied"] = panovlm_flashpatch.apply(**spec["apply"])  # before the load, as a user would
    if spec.get("liger"):
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen3
        except ImportError as exc:
            raise SystemExit(f"arm {arm} needs liger-kernel (pip install liger-kernel): {exc}")
        if spec["liger"] == "kernels":  # the chunked loss of loss_only instead of liger's fused one
            apply_liger_kernel_to_qwen3(fused_linear_cross_entropy=False, cross_entropy=False)
        else:
            apply_liger_kernel_to_qwen3()
        out["liger_kernel"] = _version("liger-kernel")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cuda = torch.cuda.is_available() and not tiny
    device = "cuda" if cuda else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, device_map=device)
    model.train()
    if spec.get("gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec["apply"] is None and "panovlm_flashpatch" in sys.modules and sys.modules["panovlm_flashpatch"].is_applied():
        raise SystemExit(f"arm {arm}: the plugin is active although DISABLE_FLASH_ATTN=1 (plain would not be plain)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    feed = batches(workload, model.config.vocab_size, seed, tiny)

    def step():
        cpu_batch, real = next(feed)
        # Batches reach the device before the clock starts: a DataLoader overlaps this with the step.
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, real, loss.detach()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = [step() for _ in range(steps)]  # no .item() per step: it would add a sync to every arm
    seconds, tokens, loss = [t[0] for t in timed], [t[1] for t in timed], timed[-1][2]
    out.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, final_loss=float(loss))
    # Each aten::_local_scalar_dense is one device-to-host sync (.item(), bool(tensor)): it stalls the CPU
    # until the GPU catches up, so a launch-bound step pays for every one.
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        [step() for _ in range(2)]
    out["syncs_per_step"] = sum(e.name == "aten::_local_scalar_dense" for e in prof.events()) / 2
    windows = {"warmup": (3, steps // 3), "middle": (steps // 3, 2 * steps // 3), "steady": (2 * steps // 3, steps),
               "overall": (3, steps)}
    out["tok_s"] = {k: sum(tokens[a:b]) / sum(seconds[a:b]) if b > a else None for k, (a, b) in windows.items()}
    out.update(median_step_s=statistics.median(seconds), step_seconds=[round(s, 5) for s in seconds], step_tokens=tokens,
               attn_implementation=getattr(model.config, "_attn_implementation", None), report=None)
    if spec["apply"] is not None:
        try:
            out["report"] = sys.modules["panovlm_flashpatch"].report(model)
        except Exception as exc:
            out["report"] = f"{type(exc).__name__}: {exc}"
    out.update(versions={"torch": torch.__version__, "transformers": transformers.__version__,
                         "flash_attn": _version("flash-attn"), "python": sys.version.split()[0]},
               flash_attn_hidden=os.environ.get(HIDE_FLASH_ATTN) == "1", gpu=torch.cuda.get_device_name(0) if cuda else "cpu")
    return out


# ---------------------------------------------------------------------------------------------- orchestrator

def child_env(arm: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not _owned(k)}
    return {**env, "HF_HUB_OFFLINE": "1", **ARMS[arm]["env"]}


def orchestrate(args) -> int:
    workloads = _checked(args.workloads, WORKLOADS, "workload")
    arms = _checked(args.arms, ARMS, "arm")
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    ckpt = make_checkpoint(args.root, args.tiny)
    commit = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    log_path = os.path.join(args.out, "runs.jsonl")
    longest: dict[str, float] = {}
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        for workload in workloads:
            # Odd repeats run the arms in reverse, so drift of the machine (clocks, heat) hits all alike.
            for arm in arms if repeat % 2 == 0 else arms[::-1]:
                base = {"workload": workload, "arm": arm, "repeat": repeat, "seed": seed, "steps": args.steps,
                        "argv": sys.argv, "commit": commit}
                elapsed = time.perf_counter() - started
                estimate = longest.get(workload, 90.0)
                if args.budget_s and elapsed + estimate > args.budget_s:
                    record = {**base, "status": "skipped", "reason": f"{elapsed:.0f} s + ~{estimate:.0f} s > budget {args.budget_s:.0f} s"}
                    print(f"[{elapsed:5.0f}s] skip r{repeat} {workload} {arm}: {record['reason']}", flush=True)
                else:
                    record = _child(base, ckpt, args, elapsed)
                    longest[workload] = max(longest.get(workload, 0.0), record["wall_s"])
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
    report(args.out)
    return 0


def _child(base: dict, ckpt: str, args, elapsed: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "one", base["workload"], base["arm"], ckpt,
           "--steps", str(args.steps), "--seed", str(base["seed"])] + (["--tiny"] if args.tiny else [])
    timeout = max(args.budget_s - elapsed, 1.0) if args.budget_s else None  # a hang must not eat the call
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(base["arm"]), timeout=timeout)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = "timeout", exc.stdout or "", exc.stderr or ""
    wall = time.perf_counter() - start
    try:
        result = json.loads(stdout.strip().splitlines()[-1])  # `one` prints its JSON line last
    except (IndexError, ValueError):
        result = None
    tag = f"[{elapsed + wall:5.0f}s] r{base['repeat']} {base['workload']:6s} {base['arm']:13s}"
    if rc != 0 or result is None:
        print(f"{tag} FAILED (rc {rc}, {wall:.0f} s): {(stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
        return {**base, "status": "failed", "returncode": rc, "wall_s": wall, "stderr_tail": stderr.splitlines()[-30:]}
    tok = result["tok_s"]
    print(f"{tag} {_fmt(tok['overall']):>7s} tok/s (warm-up {_fmt(tok['warmup'])}, steady {_fmt(tok['steady'])}), "
          f"{result['syncs_per_step']:g} syncs/step, {wall:.0f} s", flush=True)
    return {**result, **base, "status": "ok", "wall_s": wall}


# ---------------------------------------------------------------------------------------------------- report

PHASES = ("warmup", "middle", "steady")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, spec=".0f", spread=None) -> str:
    if value is None:
        return "-"
    text = format(value, spec)
    if spread and len(spread) > 1:
        text += f" ({format(min(spread), spec)}–{format(max(spread), spec)})"
    return text


def backend_of(run: dict) -> str:
    """What the plugin's report says the model's forward got, compactly; plain arms: their config's backend."""
    rep = run.get("report")
    if rep is None:
        return f"{run.get('attn_implementation') or '?'} (no plugin)"
    if isinstance(rep, str) or not rep:
        return f"report: {rep or 'empty'}"
    rec = next((r for r in rep if r.get("role") == "language model"), rep[0])
    parts = [str(rec.get("backend", "?"))]
    if rec.get("padding_free"):
        parts.append(str(rec["padding_free"]).split(":")[0])
    phases = rec.get("by_phase") or {}
    if phases.get("padded training"):
        parts.append(f"padded: {phases['padded training'].get('backend', '?')}; "
                     f"batch 1: {(phases.get('unpadded training') or {}).get('backend', '?')}")
    return "; ".join(parts)


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("status") == "ok"]
    table = {}
    for workload in dict.fromkeys(r["workload"] for r in ok):
        rows = {}
        for arm in dict.fromkeys(r["arm"] for r in ok if r["workload"] == workload):
            mine = [r for r in ok if r["workload"] == workload and r["arm"] == arm]
            row = {"n": len(mine), "backend": backend_of(mine[0])}
            for key in (*PHASES, "overall"):
                values = [r["tok_s"][key] for r in mine if r["tok_s"][key] is not None]
                row[key], row[f"{key}_all"] = _median(values), values
            for key in ("peak_gib", "median_step_s", "syncs_per_step"):
                row[key] = _median(r.get(key) for r in mine)
            rows[arm] = row
        plain = rows.get("plain", {})
        best = {k: max(rows, key=lambda a: rows[a][k] or 0) for k in ("overall", "steady", "warmup")}
        for row in rows.values():
            for k in ("overall", "steady", "warmup"):
                row[f"{k}_vs_plain"] = row[k] / plain[k] if row[k] and plain.get(k) else None
                row[f"{k}_vs_best"] = row[k] / rows[best[k]][k] if row[k] and rows[best[k]][k] else None
            row["peak_vs_plain"] = row["peak_gib"] / plain["peak_gib"] if row["peak_gib"] and plain.get("peak_gib") else None
        table[workload] = {"best": best, "rows": rows}
    return table


def verdict(entry: dict) -> str:
    """The question this benchmark asks: is the shipped default as good as the best arm, and never worse than plain?"""
    if "default" not in entry["rows"]:
        return "`default` did not run here."
    d, words = entry["rows"]["default"], []
    for k, name in (("warmup", "warm-up"), ("steady", "steady")):
        best, plain = d[f"{k}_vs_best"], d[f"{k}_vs_plain"]
        words.append(f"{name} {_fmt(best, '.2f')}× best ({entry['best'][k]}): {'within' if best and best >= 0.95 else 'NOT within'}"
                     " 5%, " + ("no plain run" if plain is None else f"{plain:.2f}× plain: {'not below' if plain >= 1 else 'BELOW'}"))
    return f"`default` is {d['backend']}. " + "; ".join(words) + "."


def markdown(runs: list[dict], table: dict) -> str:
    ok = [r for r in runs if r.get("status") == "ok"]
    env = sorted({f"GPU {r.get('gpu')}, torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, "
                  f"flash-attn {r['versions']['flash_attn']}, python {r['versions']['python']}, commit {r.get('commit', '?')}"
                  for r in ok})
    commands = sorted({" ".join(["python"] + [os.path.relpath(r["argv"][0], os.path.dirname(HERE))] + r["argv"][1:])
                       for r in runs if r.get("argv")})
    out = ["# Training throughput by workload", "", *(f"Environment: {e}" for e in env), "",
           *(f"Command: `{c}`" for c in commands), "",
           f"Steps: {sorted({r['steps'] for r in runs})}; seeds: {sorted({r['seed'] for r in runs})}. tok/s counts real "
           "(unpadded) tokens; windows are steps [3, N/3), [N/3, 2N/3), [2N/3, N) and overall [3, N); medians over "
           "repeats (min–max); × are ratios of medians; ★ best overall.", ""]
    tiny = any("--tiny" in r.get("argv", ()) for r in runs)
    head = ("| arm | n | warm-up tok/s | middle tok/s | steady tok/s | overall tok/s | ×plain overall / steady | "
            "×best overall / steady | peak GiB | ×plain peak | median step s | syncs/step | backend |")
    for workload, entry in table.items():
        size, low, high, fixed = WORKLOADS[workload]
        out += [f"## {workload}: batch {size}, lengths U[{low}, {high}]" + (", the same batch every step" if fixed else
                ", padded to each batch's longest" if size > 1 else ", no padding") + (" (÷16: --tiny)" if tiny else ""), "",
                head, "|" + "---|" * (head.count("|") - 1)]
        for arm, r in entry["rows"].items():
            mark = " ★" if entry["best"]["overall"] == arm else ""
            mark += " (best steady)" if entry["best"]["steady"] == arm and entry["best"]["overall"] != arm else ""
            out.append(f"| {arm}{mark} | {r['n']} | " + " | ".join(_fmt(r[k], ".0f", r[f"{k}_all"]) for k in (*PHASES, "overall"))
                       + f" | {_fmt(r['overall_vs_plain'], '.2f')} / {_fmt(r['steady_vs_plain'], '.2f')}"
                       f" | {_fmt(r['overall_vs_best'], '.2f')} / {_fmt(r['steady_vs_best'], '.2f')}"
                       f" | {_fmt(r['peak_gib'], '.2f')} | {_fmt(r['peak_vs_plain'], '.2f')} | {_fmt(r['median_step_s'], '.4f')}"
                       f" | {_fmt(r['syncs_per_step'], 'g')} | {r['backend']} |")
        out += ["", verdict(entry), ""]
        out += paired(ok, workload)
    for status in ("failed", "skipped"):
        bad = [r for r in runs if r.get("status") == status]
        if bad:
            out += [f"## {status.capitalize()} runs", ""]
            out += [f"- r{r['repeat']} {r['workload']} {r['arm']}: " + (r.get("reason") or f"rc {r.get('returncode')}: "
                    + " / ".join(r.get("stderr_tail", [])[-3:])) for r in bad]
            out.append("")
    return "\n".join(out)


def paired(ok: list[dict], workload: str) -> list[str]:
    """``default`` against each other plugin arm run by run: one seed is one sequence of batches, so the two runs of a
    seed did the same steps. For an arm that does the default's device work (``fa2_pf`` at batch > 1) the ratio per
    window is how far two runs move apart by the machine alone; for any other arm it is that spread plus the real
    difference."""
    # Keyed by the command as well: only runs of one device call are compared (calls differ by up to 30%).
    mine = {(r["arm"], r["seed"], " ".join(r.get("argv", ()))): r for r in ok if r["workload"] == workload}
    others = [a for a in dict.fromkeys(arm for arm, _, _ in mine) if a not in ("default", "plain")]
    lines = []
    for arm in others:
        for seed, call in [(s, c) for a, s, c in mine if a == "default" and (arm, s, c) in mine]:
            ours, theirs = mine[("default", seed, call)]["tok_s"], mine[(arm, seed, call)]["tok_s"]
            ratios = [ours[k] / theirs[k] if ours[k] and theirs[k] else None for k in (*PHASES, "overall")]
            lines.append(f"| {arm} | {seed} | " + " | ".join(_fmt(v, ".3f") for v in ratios) + " |")
    if not lines:
        return []
    return ["Run by run (the same seed: the same batches), `default` ÷ the arm:", "",
            "| arm | seed | warm-up | middle | steady | overall |", "|---|---|---|---|---|---|", *lines, ""]


def chart(runs: list[dict], table: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "results.png skipped: matplotlib is not installed"
    fig, axes = plt.subplots(2, len(table), figsize=(5 * len(table), 7), dpi=80, squeeze=False)
    for col, (workload, entry) in enumerate(table.items()):
        arms = list(entry["rows"])
        top = axes[0][col]
        for i, (key, name) in enumerate((("warmup", "warm-up"), ("steady", "steady"))):
            top.bar([x + 0.4 * i for x in range(len(arms))], [entry["rows"][a][key] or 0 for a in arms], 0.4, label=name)
        top.set_xticks([x + 0.2 for x in range(len(arms))], arms, rotation=30, ha="right")
        top.set(title=workload, ylabel="real tokens/s")
        top.legend(fontsize=8)
        bottom = axes[1][col]
        for arm in arms:
            mine = [r for r in runs if r.get("status") == "ok" and r["workload"] == workload and r["arm"] == arm]
            per_step = [[t / s for t, s in zip(r["step_tokens"], r["step_seconds"])] for r in mine]
            median = [statistics.median(v) for v in zip(*per_step)]  # per step, over repeats
            rolling = [statistics.median(median[max(0, i - 9):i + 1]) for i in range(len(median))]
            bottom.plot(range(len(rolling)), rolling, label=arm, linewidth=1)
        bottom.set(xlabel="step", ylabel="tokens/s, rolling median of 10")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return None


def report(out: str) -> int:
    runs = []  # every *.jsonl: runs of several device calls make one table
    for path in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
        with open(path) as f:
            runs += [json.loads(line) for line in f if line.strip()]
    table = summarize(runs)
    text = markdown(runs, table)
    note = chart(runs, table, os.path.join(out, "results.png"))
    text += f"\n{note}\n" if note else ""
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"workloads": table, "failed": [r for r in runs if r.get("status") == "failed"],
                   "skipped": [r for r in runs if r.get("status") == "skipped"]}, f, indent=1)
    print(text)
    return 0


def main() -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--steps", type=int, default=300)
    common.add_argument("--seed", type=int, default=0, help="run: repeat i uses seed + i")
    common.add_argument("--tiny", action="store_true")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common])
    run.add_argument("--workloads", default="dyn8,dyn16,b1,fixed8")
    run.add_argument("--arms", default="plain,flash_first,fa2,fa2_pf,default")
    run.add_argument("--repeats", type=int, default=2)
    run.add_argument("--out", required=True)
    run.add_argument("--root", default="/tmp/panovlm_workloads", help="where the checkpoint is built once")
    run.add_argument("--budget-s", type=float, default=None, help="start no run that would end past this")
    one = sub.add_parser("one", parents=[common])
    for name in ("workload", "arm", "ckpt"):
        one.add_argument(name)
    sub.add_parser("report").add_argument("out")
    args = parser.parse_args()
    if args.command == "run":
        return orchestrate(args)
    if args.command == "report":
        return report(args.out)
    _checked(args.workload, WORKLOADS, "workload")
    _checked(args.arm, ARMS, "arm")
    print(json.dumps(run_one(args.workload, args.arm, args.ckpt, args.steps, args.seed, args.tiny)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
