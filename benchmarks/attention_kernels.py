"""Attention alone, forward+backward in bf16 on CUDA: each kernel the training workloads can reach, per shape.

    python benchmarks/attention_kernels.py [--out /tmp/attention_kernels.json]

Qwen3-0.6B's attention (16 query heads, 8 kv heads, head dim 128, causal) at (batch, length) (8, 1024),
(1, 1536), (1, 4096), and one packed row of 8 sequences (4,340 tokens). SDPA runs under each backend forced
(cuDNN, flash, efficient) and under torch's own choice, fed as transformers feeds it; the packed row reaches
SDPA padded to 8 x 912 with a padding mask (as padded training hands it over) and flash-attn's varlen kernel
and torch's varlen_attn packed, with cu_seqlens. Median of 50 timed calls after 10 warm-up (CUDA events). cuDNN
builds an execution plan per new shape: the first call of 5 new lengths shows that cost, which dynamic padding
pays nearly every step. A backend that raises on a shape is recorded with its error. No CUDA: "no CUDA: skipped".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import statistics
import time

import torch
import torch.nn.functional as F

HQ, HKV, DIM = 16, 8, 128
SHAPES = [(8, 1024), (1, 1536), (1, 4096)]
PACKED = [912, 512, 300, 700, 600, 416, 500, 400]


def rand(*shape):  # weights and activations of bf16 training
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def fwd_bwd(attn, *tensors):
    """One call of forward and backward (gradients returned, not accumulated)."""
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = attn(*tensors)
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(attn(*tensors), tensors, grad)


def timed(call, warmup: int = 10, iters: int = 50) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa_attn(lengths: list[int], width: int):
    """SDPA as transformers calls it: a transposed (B, H, S, D) view; without padding is_causal and GQA in the
    kernel, with padding a boolean causal-and-padding mask and the kv heads repeated (no GQA with a mask)."""
    if all(n == width for n in lengths):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    keys = torch.arange(width, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    mask = torch.ones(width, width, dtype=torch.bool, device="cuda").tril()[None, None] & keys[:, None, None, :]
    rep = HQ // HKV
    return lambda q, k, v: F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                          attn_mask=mask)


def cases(lengths: list[int], varlen_attn) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, width = len(lengths), max(lengths)
    padded = [rand(batch, width, h, DIM).transpose(1, 2) for h in (HQ, HKV, HKV)]
    out = {"sdpa_default": lambda: timed(fwd_bwd(sdpa_attn(lengths, width), *padded))}
    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def forced(backend=backend):
            with sdpa_kernel([backend]):
                return timed(fwd_bwd(sdpa_attn(lengths, width), *padded))
        out[name] = forced
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    packed = [rand(sum(lengths), h, DIM) for h in (HQ, HKV, HKV)]  # (tokens, heads, dim)
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        if len(set(lengths)) == 1:  # what FlashAttention-2 gets for a batch without padding
            q, k, v = (t.transpose(1, 2) for t in padded)
            out["flash_attn"] = lambda: timed(fwd_bwd(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v))
        else:
            out["flash_attn_varlen"] = lambda: timed(fwd_bwd(
                lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, width, width, causal=True), *packed))
    except ImportError as exc:
        out["flash_attn"] = f"not importable: {exc}"
    if varlen_attn is not None:
        params = inspect.signature(varlen_attn).parameters
        kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
            attn = lambda q, k, v: varlen_attn(q, k, v, cu, cu, width, width, **kwargs)
        else:  # torch 2.11 has no GQA argument: repeat the kv heads, inside the timed call (as a caller must)
            attn = lambda q, k, v: varlen_attn(q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1),
                                               cu, cu, width, width, **kwargs)
        out["torch_varlen_attn"] = lambda: timed(fwd_bwd(attn, *packed))
    return out


def run(case):
    try:
        return round(case(), 4) if callable(case) else case
    except Exception as exc:  # a backend that cannot run this shape: its reason, and go on
        return f"error: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def first_calls() -> list[dict]:
    """cuDNN's first call of a new shape builds its plan (forward and backward); the second reuses it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for length in range(1000, 1005):
        tensors = [rand(8, length, h, DIM).transpose(1, 2).detach().requires_grad_() for h in (HQ, HKV, HKV)]
        row = {"shape": f"B=8 S={length}"}
        for which in ("first_ms", "second_ms"):
            def once():
                torch.cuda.synchronize()
                start = time.perf_counter()
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    F.scaled_dot_product_attention(*tensors, is_causal=True, enable_gqa=True).sum().backward()
                torch.cuda.synchronize()
                return (time.perf_counter() - start) * 1e3
            row[which] = run(once)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/attention_kernels.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: skipped")
        return 0
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    shapes = {f"B={b} S={s}": [s] * b for b, s in SHAPES}
    shapes[f"packed {len(PACKED)} seqs, {sum(PACKED)} tokens (SDPA: {len(PACKED)}x{max(PACKED)} padded)"] = PACKED
    results = {label: {name: run(case) for name, case in cases(lengths, varlen_attn).items()}
               for label, lengths in shapes.items()}
    names = list(dict.fromkeys(n for r in results.values() for n in r))
    print("fwd+bwd ms, median of 50\n" + f"{'shape':46s}" + "".join(f"{n:>18s}" for n in names))
    for label, r in results.items():
        print(f"{label:46s}" + "".join(f"{(r[n] if isinstance(r.get(n), float) else 'err' if n in r else '-'):>18}" for n in names))
    print("".join(f"  {label} / {n}: {v}\n" for label, r in results.items() for n, v in r.items() if isinstance(v, str)), end="")
    firsts = first_calls()
    print("cuDNN, new shape: first call (plan build) vs second, ms")
    for r in firsts:
        print(f"  {r['shape']}: {r['first_ms']} vs {r['second_ms']}")
    try:
        flash_attn = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        flash_attn = None
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                   "flash_attn": flash_attn, "varlen_attn_signature": str(inspect.signature(varlen_attn)) if varlen_attn else None,
                   "heads": [HQ, HKV, DIM], "packed_lengths": PACKED, "ms": results, "cudnn_first_call": firsts}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
