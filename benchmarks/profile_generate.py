"""Why is batched generation slower on FlashAttention-2 than on SDPA? Profiles a short greedy decode.

    python benchmarks/profile_generate.py CKPT_DIR

For each backend: wall time per new token, and per decode step the number of host-device syncs
(aten::item / aten::_local_scalar_dense / cudaStreamSynchronize...) and the CPU time of the ops the
attention path runs, from torch.profiler. Prints a small table; no files.
"""

from __future__ import annotations

import os
import sys
import time

os.environ["PANOVLM_FLASHPATCH_AUTO"] = "0"  # measure transformers' own backends, not the plugin's choice
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench  # noqa: E402


def prompts():
    lengths = bench._lengths(256, 512, 8, seed=2)
    width = max(lengths)
    ids = torch.zeros(8, width, dtype=torch.long)
    mask = torch.zeros(8, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, 151_000, (n,))
        mask[i, width - n:] = 1
    return ids.cuda(), mask.cuda()


def main() -> int:
    from transformers import AutoModelForCausalLM

    paths = bench.make_checkpoints(sys.argv[1])
    ids, mask = prompts()
    new = 32
    for impl in ("sdpa", "flash_attention_2"):
        model = AutoModelForCausalLM.from_pretrained(paths["lm"], device_map="cuda", dtype=torch.bfloat16, attn_implementation=impl).eval()
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(**kw)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(**kw)
            torch.cuda.synchronize()
            per_token = (time.perf_counter() - t) / new
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model.generate(**kw)
                torch.cuda.synchronize()
        events = prof.key_averages()
        syncs = {e.key: e.count for e in events if e.key in ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")}
        top = sorted((e for e in events if e.key.startswith(("aten::", "flash_attn", "FlashAttn"))), key=lambda e: -e.self_cpu_time_total)[:12]
        print(f"== {impl}: {per_token * 1000:.2f} ms per new token (batch 8)")
        print("   per decode step: " + ", ".join(f"{k} {v / new:.1f}" for k, v in sorted(syncs.items())))
        for e in top:
            print(f"   {e.key:45s} calls/step {e.count / new:7.1f}   self CPU us/step {e.self_cpu_time_total / new:9.1f}")
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
