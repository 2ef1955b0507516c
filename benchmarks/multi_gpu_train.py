"""One training run under torchrun on N GPUs, DDP or FSDP, the plugin activated automatically (issue 7).

    torchrun --nproc_per_node=2 benchmarks/multi_gpu_train.py CKPT OUT_DIR ddp|fsdp [--steps 20]

The script never imports panovlm_flashpatch before loading: the installed package's start-up hook
patches every rank (set PANOVLM_FLASHPATCH_PADDING_FREE=1 for padding-free). Each rank loads the
checkpoint onto its own GPU (``LOCAL_RANK``), wraps it (DDP, or FSDP2's ``fully_shard`` per decoder
layer), and trains on its own shard of synthetic right-padded batches (8 sequences of 128..1024 tokens
per rank per step, as workload (a)). Each rank writes ``rank<N>.json`` into OUT_DIR: what the plugin
decided there (its report), the loss of every step (mean over ranks), step times, real-token
throughput of this GPU and its peak memory. tests/gpu/test_gpu_multi.py reads those files.

``--load-only`` stops after the load (for the cross-rank check; with ``--backend gloo`` several ranks
may share one GPU). For that test, ``MULTI_GPU_TEST_BROKEN_RANK=N`` puts the folder named by
``MULTI_GPU_TEST_SHADOW`` first on rank N's import path (a flash_attn_2_cuda that fails to import).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import sys

if os.environ.get("MULTI_GPU_TEST_BROKEN_RANK") == os.environ.get("RANK"):
    sys.path.insert(0, os.environ["MULTI_GPU_TEST_SHADOW"])  # before anything imports flash-attn

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def batches(steps: int, rank: int, vocab: int, batch: int = 8):
    g = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        lengths = torch.randint(128, 1025, (batch,), generator=g).tolist()
        width = max(lengths)
        ids = torch.randint(0, vocab, (batch, width), generator=g)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}, sum(lengths)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("wrapper", choices=["ddp", "fsdp"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--load-only", action="store_true")
    args = parser.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(device)
    if args.backend == "nccl":
        dist.init_process_group("nccl", device_id=torch.device("cuda", device))
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, device_map={"": device})
    model.train()
    if args.load_only:
        import panovlm_flashpatch

        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "report": panovlm_flashpatch.report(model)}, f)
        dist.barrier()
        dist.destroy_process_group()
        return 0
    if args.wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device])
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    losses, times, tokens = [], [], []
    for data, real in batches(args.steps, rank, model.config.vocab_size):
        data = {k: v.cuda() for k, v in data.items()}
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = wrapped(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens.append(real)
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    import panovlm_flashpatch  # only to read the report; activation happened without it

    warm = slice(3, None)  # the first steps pay kernel selection and allocator growth
    result = {
        "rank": rank, "local_rank": local_rank, "device": device, "world": world, "wrapper": args.wrapper,
        "applied": panovlm_flashpatch.is_applied(),
        "report": [{k: r[k] for k in ("component", "backend", "dtype", "reason", "padding_free")}
                   for r in panovlm_flashpatch.report(model)],
        "losses": losses, "seconds_per_step": statistics.median(times[warm]),
        "tokens_per_second": sum(tokens[warm]) / sum(times[warm]),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "gpu": torch.cuda.get_device_name(device),
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
