"""One benchmark configuration in this process: a PanoLLaVA-shaped workload, plain transformers or the plugin.

    python benchmarks/bench.py WORKLOAD MODE CKPT_DIR  ->  one JSON line on stdout

WORKLOAD: train (Qwen3-0.6B-shaped LM, forward+backward, batch 8 right-padded, lengths 128..1024;
train512 and train64: lengths 512..1024 and 64..1024, less and more padding; train16: batch 16),
generate (8 left-padded prompts of 256..512 tokens, 128 new tokens, greedy), vision (SigLIP-base
vision tower, forward+backward, batch 64 at 224 px), load (from_pretrained wall time; mode
"retry" measures a load whose FlashAttention-2 attempt transformers refuses).
MODE: plain (transformers as it is: SDPA), plugin (panovlm_flashpatch applied), packed (applied with
padding_free=True: padded training forwards run packed) or loss_only (padding_free="loss_only").
Checkpoints are random-initialised, made by run.py, and loaded through from_pretrained.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

LM_SHAPE = dict(  # Qwen3-0.6B
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
    tie_word_embeddings=True, rms_norm_eps=1e-6,
)
VISION_SHAPE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16)


def make_checkpoints(root: str) -> dict[str, str]:
    """Random-initialised bf16 checkpoints (run once, by run.py)."""
    import transformers

    paths = {"lm": os.path.join(root, "qwen3-0.6b-shaped"), "vision": os.path.join(root, "siglip-base-shaped")}
    if not os.path.isdir(paths["lm"]):
        torch.manual_seed(0)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**LM_SHAPE)).to(torch.bfloat16)
        model.save_pretrained(paths["lm"])
    if not os.path.isdir(paths["vision"]):
        torch.manual_seed(0)
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION_SHAPE)).to(torch.bfloat16)
        model.save_pretrained(paths["vision"])
    return paths


def _time_cuda(fn, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _peak_reset():
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def _lengths(low: int, high: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=g).tolist()


#: (shortest, longest, batch) of each training workload.
TRAIN_SHAPES = {"train": (128, 1024, 8), "train512": (512, 1024, 8), "train64": (64, 1024, 8), "train16": (128, 1024, 16)}


def bench_train(path: str, low: int = 128, high: int = 1024, batch_size: int = 8) -> dict:
    from transformers import AutoModelForCausalLM

    from panovlm_flashpatch.tiny import padding_mask

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
    model.train()
    lengths = _lengths(low, high, batch_size, seed=0)
    width = max(lengths)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151_000, (batch_size, width), generator=g)
    mask = padding_mask(lengths, width, "right")
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": labels.cuda()}

    def step():
        loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    _peak_reset()
    times = _time_cuda(step, warmup=2, repeat=10)
    real = sum(lengths)
    return {"seconds": statistics.median(times), "per_second": real / statistics.median(times), "unit": "tokens/s",
            "peak_gib": _peak_gib(), "real_tokens": real, "padded_tokens": batch_size * width, "model": model}


def bench_generate(path: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda").eval()
    lengths = _lengths(256, 512, 8, seed=2)
    width = max(lengths)
    g = torch.Generator().manual_seed(3)
    ids = torch.full((8, width), 0, dtype=torch.long)
    mask = torch.zeros(8, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(0, 151_000, (n,), generator=g)
        mask[i, width - n:] = 1  # left padding
    kwargs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=128, min_new_tokens=128,
                  do_sample=False, pad_token_id=0)

    def run():
        with torch.no_grad():
            out = model.generate(**kwargs)
        assert out.shape[1] == width + 128

    run()
    _peak_reset()
    times = _time_cuda(run, warmup=1, repeat=3)
    return {"seconds": statistics.median(times), "per_second": 8 * 128 / statistics.median(times), "unit": "new tokens/s",
            "peak_gib": _peak_gib(), "model": model}


def bench_vision(path: str) -> dict:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, device_map="cuda")
    model.train()
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(4)).to("cuda", dtype)

    def step():
        model(pixel_values=pixels).last_hidden_state.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    step()
    _peak_reset()
    times = _time_cuda(step, warmup=2, repeat=10)
    return {"seconds": statistics.median(times), "per_second": 64 / statistics.median(times), "unit": "images/s",
            "peak_gib": _peak_gib(), "model": model}


class _TrueOnTheClassOnly:
    def __get__(self, instance, owner):
        return instance is None


def bench_load(path: str, refuse: bool = False) -> dict:
    """Wall time of from_pretrained (to the GPU), after one warm-up load in this process."""
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    cls = AutoModelForCausalLM
    if refuse:  # a class transformers refuses FlashAttention-2 for after the plugin chose it: one retry
        cls = type("RefusingQwen3", (Qwen3ForCausalLM,), {"_supports_flash_attn": _TrueOnTheClassOnly()})
    times = []
    model = None
    for i in range(4):
        del model
        torch.cuda.synchronize()
        start = time.perf_counter()
        model = cls.from_pretrained(path, device_map="cuda")
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "per_second": 1 / statistics.median(times), "unit": "loads/s",
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "model": model}


def main() -> int:
    workload, mode, root = sys.argv[1:4]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PANOVLM_FLASHPATCH_AUTO"] = "0"  # read when transformers is imported: plain stays plain
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    paths = make_checkpoints(root)
    if mode in ("plugin", "retry", "packed", "loss_only"):
        import panovlm_flashpatch

        assert panovlm_flashpatch.apply(padding_free={"packed": True, "loss_only": "loss_only"}.get(mode, False))
    else:
        assert mode == "plain"
        try:
            import panovlm_flashpatch  # installed with automatic activation: take it off for "plain"

            panovlm_flashpatch.remove()
        except ImportError:
            pass
    if workload in TRAIN_SHAPES:
        result = bench_train(paths["lm"], *TRAIN_SHAPES[workload])
    elif workload == "generate":
        result = bench_generate(paths["lm"])
    elif workload == "vision":
        result = bench_vision(paths["vision"])
    elif workload == "load":
        result = bench_load(paths["lm"], refuse=(mode == "retry"))
    else:
        raise SystemExit(f"unknown workload {workload!r}")
    model = result.pop("model")
    backend = getattr(model.config, "_attn_implementation", "?")
    records = []
    if mode != "plain":
        import panovlm_flashpatch

        records = panovlm_flashpatch.report(model)
    if records:
        result["overhead_ms"] = records[0]["overhead_ms"]
        backend = records[0]["backend"]  # the config holds the last forward's pick (generate() ran on SDPA)
    result.update(workload=workload, mode=mode, backend=backend, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                  phases=records[0].get("phases", {}) if records else {}, retried=bool(records and records[0]["retried"]),
                  padding_free=records[0].get("padding_free") if records else None)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
