"""Where a padding-free training step spends its time (issue 5, on the GPU machine).

    python benchmarks/profile_padding_free.py [--root /tmp/ck]

Workload (a) of bench.py (Qwen3-0.6B-shaped, batch 8 right-padded 128..1024, fwd+bwd with labels), one
process, arms interleaved: plain SDPA padded; the same tokens packed by hand into one row and given
to the model directly (position_ids only, then with cu_seq_lens as the plugin passes them); the
plugin's wrapper on the padded batch. The gap between the hand-packed row and the wrapper is what
packing and unpacking cost. Then torch.profiler tables for the hand-packed and wrapper steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/panovlm_bench_ckpts")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    os.environ["PANOVLM_FLASHPATCH_AUTO"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, HERE)
    import bench
    import transformers
    import panovlm_flashpatch
    from panovlm_flashpatch import tiny
    from panovlm_flashpatch.runtime import padding_free

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = bench.make_checkpoints(args.root)["lm"]
    plain = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cuda").train()
    assert panovlm_flashpatch.apply(padding_free=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cuda").train()

    lengths = bench._lengths(128, 1024, 8, seed=0)
    width = max(lengths)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151_000, (8, width), generator=g)
    mask = tiny.padding_mask(lengths, width, "right")
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": labels.cuda()}
    keep = mask.bool().flatten()
    pos = torch.cat([torch.arange(n) for n in lengths])
    plab = labels.flatten()[keep].masked_fill(pos == 0, -100)
    hand = {"input_ids": ids.flatten()[keep][None].cuda(), "position_ids": pos[None].cuda(), "labels": plab[None].cuda()}
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    varlen = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))

    def step(m, call):
        def run():
            out = m(**call)
            out.loss.backward()
            m.zero_grad(set_to_none=True)
        return run

    arms = {
        "plain sdpa, padded": step(plain, batch),
        "fa2, hand-packed row, position_ids only": step(model, {**hand, "use_cache": False}),
        "fa2, hand-packed row + cu_seq_lens": step(model, {**hand, **varlen, "use_cache": False}),
        "plugin wrapper on the padded batch": step(model, batch),
    }
    times = {k: [] for k in arms}
    peaks = {}
    for fn in arms.values():
        for _ in range(2):
            fn()
    for rep in range(args.repeat):
        for name, fn in arms.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    base = statistics.median(times["plain sdpa, padded"])
    print(f"tokens: {sum(lengths)} real of {8 * width} ({sum(lengths) / (8 * width):.0%}); "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("| arm | s/step (median of %d) | speed-up vs plain | peak GiB |" % args.repeat)
    print("|---|---|---|---|")
    for name in arms:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.4f} | {base / t:.3f} | {peaks[name]:.2f} |")
    assert padding_free.is_armed(model)

    from torch.profiler import ProfilerActivity, profile

    for name in ("fa2, hand-packed row + cu_seq_lens", "plugin wrapper on the padded batch"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                arms[name]()
            torch.cuda.synchronize()
        print(f"\n== {name}: top 12 by CUDA time (3 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
