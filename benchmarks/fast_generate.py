"""Decoding with ``fast_generate`` against plain transformers (issue 15), side by side on one GPU.

    python benchmarks/fast_generate.py --root /tmp/ck --out DIR [--loop 64] [--arms off,fast] [--rounds 3]

Qwen3-0.6B-shaped LM (random init, bf16, loaded through from_pretrained), greedy, 128 new tokens
(``min_new_tokens=128``, so every arm decodes the same number). Each arm is one fresh process, so that
compilation is paid where a user pays it:

* ``off``: plain transformers and the plugin with the switch off (its default), both loaded in one process and
  called alternately (plain, plugin, plain, ...): steady-state tokens/s at batch 1 (one 512-token prompt) and
  batch 8 (eight 512-token prompts), the ratio per pair; then the evaluation loop on plain transformers.
* ``fast``: the plugin with ``fast_generate=True`` in a fresh process: the evaluation loop first (its first
  call pays the compilation, as a user's would), then batch 1 and batch 8 (first call and steady state), and
  greedy tokens compared with plain transformers' on the same weights.

Evaluation loop: batch 1, prompt lengths 300, 512, 411, 300, 257, 480, 333, 512 (issue 15), then lengths
drawn from U[257, 512], one generate() each; end-to-end seconds after 8 calls and after all of them.
Writes DIR/fast_generate_<arm>.json per arm as it goes, then DIR/fast_generate.md and .json (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIRST_EIGHT = [300, 512, 411, 300, 257, 480, 333, 512]
NEW = 128


def _loop_lengths(n: int) -> list[int]:
    import random

    rng = random.Random(15)
    return (FIRST_EIGHT + [rng.randint(257, 512) for _ in range(max(n - 8, 0))])[:n]


def _prompt(batch: int, length: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151_000, (batch, length), generator=g).cuda()


def _generate(model, ids, **extra):
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, pad_token_id=0, **extra)
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + NEW
    return out, time.perf_counter() - started


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cuda").eval()


def _loop(model, n: int, partial=None) -> dict:
    times = []
    for i, length in enumerate(_loop_lengths(n)):
        times.append(_generate(model, _prompt(1, length, 100 + i))[1])
        if partial is not None and len(times) % 8 == 0:
            partial({"calls_done": len(times), "per_call_s": [round(t, 4) for t in times]})  # kept if the run is cut short
    return {"calls": n, "per_call_s": [round(t, 4) for t in times], "after_8_s": round(sum(times[:8]), 2),
            "total_s": round(sum(times), 2), "steady_median_s": round(statistics.median(times[8:] or times), 4)}


def arm_off(path: str, loop: int, rounds: int, out: dict, save) -> None:
    """Plain transformers and the plugin's default, alternately, in one process (rounds=0: the loop only)."""
    import panovlm_flashpatch

    panovlm_flashpatch.remove()
    plain = _load(path)
    assert panovlm_flashpatch.apply(fast_generate=False)
    plugin = _load(path)
    out["plugin_backend"] = panovlm_flashpatch.report(plugin)[0]["backend"]
    for name, batch in (("batch1", 1), ("batch8", 8)) if rounds else ():
        ids = _prompt(batch, 512, 7)
        _generate(plain, ids), _generate(plugin, ids)  # warm-up: kernels, cuDNN plans, allocator
        pairs = []
        for _ in range(rounds):
            t_plain, t_plugin = _generate(plain, ids)[1], _generate(plugin, ids)[1]
            pairs.append({"plain_s": round(t_plain, 4), "plugin_off_s": round(t_plugin, 4), "ratio": round(t_plain / t_plugin, 4)})
        out[name] = {"pairs": pairs, "plain_tok_s": round(batch * NEW / statistics.median(p["plain_s"] for p in pairs), 1),
                     "plugin_off_tok_s": round(batch * NEW / statistics.median(p["plugin_off_s"] for p in pairs), 1),
                     "ratio_median": round(statistics.median(p["ratio"] for p in pairs), 3)}
        save()
    del plugin
    if loop:
        def partial(done):
            out["loop_plain_partial"] = done
            save()

        out["loop_plain"] = _loop(plain, loop, partial)
        out.pop("loop_plain_partial", None)
        save()


def arm_fast(path: str, loop: int, rounds: int, out: dict, save) -> None:
    import torch

    import panovlm_flashpatch

    panovlm_flashpatch.remove()
    plain = _load(path)  # for the token comparison only, called after the fast model has run
    assert panovlm_flashpatch.apply(fast_generate=True)
    model = _load(path)
    if loop:
        out["loop_fast"] = _loop(model, loop)
        out["loop_fast"]["compilations"] = model.__dict__["_panovlm_flashpatch_generate"]["compilations"]
        save()
    for name, batch in (("batch1", 1), ("batch8", 8)) if rounds else ():
        ids = _prompt(batch, 512, 7)
        before = model.__dict__["_panovlm_flashpatch_generate"]["compilations"]
        first_out, first = _generate(model, ids)
        _generate(model, ids)
        times = [_generate(model, ids)[1] for _ in range(max(rounds, 3))]
        compiled = model.__dict__["_panovlm_flashpatch_generate"]["compilations"] - before
        reference = _generate(plain, ids)[0]
        same = bool(torch.equal(first_out, reference))
        match = float((first_out[:, -NEW:] == reference[:, -NEW:]).float().mean())
        out[name] = {"first_call_s": round(first, 2), "compilations_in_first_call": compiled,
                     "fast_tok_s": round(batch * NEW / statistics.median(times), 1),
                     "steady_s": [round(t, 4) for t in times], "tokens_identical": same, "token_match": round(match, 4)}
        save()
    out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["report"] = panovlm_flashpatch.report(model)[0]["fast_generate"]


def _match(a, b) -> dict:
    import torch

    return {"identical": bool(torch.equal(a, b)), "token_match": round(float((a[:, -NEW:] == b[:, -NEW:]).float().mean()), 4)}


def arm_tokens(path: str, loop: int, rounds: int, out: dict, save) -> None:
    """Greedy tokens, batch 1, one 512-token prompt: transformers' own static cache against its dynamic one, and
    fast_generate against transformers' static cache of the same length (1024, the bucket fast_generate picks)."""
    import panovlm_flashpatch

    panovlm_flashpatch.remove()
    plain = _load(path)
    ids = _prompt(1, 512, 7)
    dynamic = _generate(plain, ids)[0]
    static = _generate(plain, ids, cache_implementation="static", max_cache_len=1024)[0]
    assert panovlm_flashpatch.apply(fast_generate=True)
    fast = _generate(_load(path), ids)[0]
    out["tokens"] = {"plain static vs plain dynamic": _match(static, dynamic),
                     "fast_generate vs plain static (same cache length)": _match(fast, static),
                     "fast_generate vs plain dynamic": _match(fast, dynamic)}


def child(arm: str, root: str, loop: int, rounds: int, target: str) -> int:
    os.environ["PANOVLM_FLASHPATCH_AUTO"] = "0"
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    sys.path.insert(0, HERE)
    from bench import make_checkpoints

    path = make_checkpoints(root)["lm"]
    out = {"arm": arm, "torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0)}

    def save():
        with open(target, "w") as fh:
            json.dump(out, fh, indent=1)

    {"off": arm_off, "fast": arm_fast, "tokens": arm_tokens}[arm](path, loop, rounds, out, save)
    save()
    return 0


def table(results: dict) -> str:
    off, fast = results.get("off", {}), results.get("fast", {})
    env = off or fast
    lines = [f"# fast_generate vs plain transformers ({env.get('gpu')}, torch {env.get('torch')}, "
             f"transformers {env.get('transformers')})", "",
             "Qwen3-0.6B-shaped LM, bf16, greedy, 512-token prompts, 128 new tokens. tok/s = new tokens per second.", "",
             "| workload | plain | plugin, switch off (ratio to plain) | fast_generate: steady | x plain | first call (compilations) | tokens identical |",
             "|---|---|---|---|---|---|---|"]
    for name in ("batch1", "batch8"):
        o, f = off.get(name, {}), fast.get(name, {})
        plain = o.get("plain_tok_s")
        speed = f"{f['fast_tok_s'] / plain:.1f}x" if plain and f.get("fast_tok_s") else "-"
        lines.append(f"| {name} | {plain or '-'} | {o.get('plugin_off_tok_s', '-')} ({o.get('ratio_median', '-')}) | "
                     f"{f.get('fast_tok_s', '-')} | {speed} | {f.get('first_call_s', '-')} s ({f.get('compilations_in_first_call', '-')}) | "
                     f"{f.get('tokens_identical', '-')} ({f.get('token_match', '-')}) |")
    lp, lf = off.get("loop_plain"), fast.get("loop_fast")
    for label, match in results.get("tokens", {}).get("tokens", {}).items():
        lines.append(f"\nGreedy tokens, batch 1: {label}: identical {match['identical']}, {match['token_match']:.1%} of tokens equal.")
    if lp or lf:
        lines += ["", "| evaluation loop (batch 1) | plain | fast_generate | speed-up |", "|---|---|---|---|"]
        for key, label in (("after_8_s", "first 8 calls, s"), ("total_s", "all calls, s")):
            a, b = (lp or {}).get(key), (lf or {}).get(key)
            lines.append(f"| {label} ({(lf or lp)['calls']} calls) | {a or '-'} | {b or '-'} | "
                         f"{f'{a / b:.2f}x' if a and b else '-'} |")
        if lf:
            lines.append(f"| compilations | - | {lf.get('compilations')} | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/ck")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "fast_generate"))
    parser.add_argument("--arms", default="off,fast")
    parser.add_argument("--loop", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="steady-state rounds (0: the loop only)")
    parser.add_argument("--merge", help="a results folder of an earlier call whose arms' other parts are kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        return child(args.child, args.root, args.loop, args.rounds, os.path.join(args.out, f"fast_generate_{args.child}.json"))
    results = {}
    for arm in args.arms.split(","):
        env = {**os.environ, "PANOVLM_FLASHPATCH_AUTO": "0", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, __file__, "--child", arm, "--root", args.root, "--out", args.out,
               "--loop", str(args.loop), "--rounds", str(args.rounds)]
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env)
        print(f"arm {arm}: exit {done.returncode} in {time.perf_counter() - started:.0f} s", flush=True)
        target = os.path.join(args.out, f"fast_generate_{arm}.json")
        if os.path.exists(target):
            with open(target) as fh:
                results[arm] = json.load(fh)
    for arm in ("off", "fast", "tokens"):  # parts of an arm run in an earlier call (--merge DIR), kept beside this one's
        target = os.path.join(args.merge or args.out, f"fast_generate_{arm}.json")
        if os.path.exists(target) and os.path.abspath(target) != os.path.join(os.path.abspath(args.out), f"fast_generate_{arm}.json"):
            with open(target) as fh:
                results[arm] = {**json.load(fh), **results.get(arm, {})}
    text = table(results)
    with open(os.path.join(args.out, "fast_generate.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "fast_generate.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
