"""A short training run, padded vs packed: do the loss curves match? (issue 5, on the GPU machine)

    python benchmarks/padding_free_train.py [--steps 300] [--out benchmarks/results]

Three arms on the same random-initialised bf16 checkpoint (a 4-layer Qwen3-style LM, hidden 512)
and the same synthetic batches (8 right-padded sequences of 32..512 tokens that follow a noisy
rule, so the loss falls): plain transformers padded on SDPA, plain transformers padded on
FlashAttention-2, and the plugin with padding-free (FlashAttention-2 on the packed row). The two
padded arms differ only in attention kernel: their gap is the bf16 noise floor the packed arm is
judged against. Writes padding_free_train_seed<N>.json (every step's loss) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

SHAPE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True)


def batches(steps: int, seed: int):
    from panovlm_flashpatch.tiny import padding_mask  # here: main() sets the environment before transformers loads

    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        lengths = torch.randint(32, 513, (8,), generator=g).tolist()
        width = max(lengths)
        start = torch.randint(0, 4096, (8, 1), generator=g)
        # token i+1 = (5 * token i + 7) mod 4096, with 10% of tokens replaced by noise: learnable
        ids = torch.empty(8, width, dtype=torch.long)
        ids[:, :1] = start
        for i in range(1, width):
            ids[:, i] = (5 * ids[:, i - 1] + 7) % 4096
        noise = torch.rand(8, width, generator=g) < 0.1
        ids = torch.where(noise, torch.randint(0, 4096, (8, width), generator=g), ids)
        mask = padding_mask(lengths, width, "right")
        ids = ids.masked_fill(mask == 0, 0)
        yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(path: str, arm: str, steps: int, seed: int) -> dict:
    import transformers
    import panovlm_flashpatch

    panovlm_flashpatch.remove()
    kwargs = {"device_map": "cuda", "dtype": torch.bfloat16}
    if arm == "packed":
        assert panovlm_flashpatch.apply(padding_free=True)
    else:
        kwargs["attn_implementation"] = arm
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    data_on_gpu = [{k: v.cuda() for k, v in data.items()} for data in batches(steps, seed)]  # not timed
    torch.cuda.synchronize()
    started = time.perf_counter()
    for data in data_on_gpu:
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    record = panovlm_flashpatch.report(model)
    panovlm_flashpatch.remove()
    return {"arm": arm, "backend": model.config._attn_implementation, "losses": losses, "seconds": seconds,
            "padding_free": record[0]["padding_free"] if record else None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="weights and data")
    parser.add_argument("--root", default="/tmp/panovlm_pf_train")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PANOVLM_FLASHPATCH_AUTO"] = "0"  # an installed wheel must not patch the plain arms
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = os.path.join(args.root, f"lm-seed{args.seed}")
    if not os.path.isdir(path):
        torch.manual_seed(args.seed)
        transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE)).to(torch.bfloat16).save_pretrained(path)
    arms = [train(path, arm, args.steps, args.seed) for arm in ("sdpa", "flash_attention_2", "packed")]
    padded_sdpa, padded_fa2, packed = (a["losses"] for a in arms)

    def gap(a, b, window=slice(None)):
        d = [abs(x - y) for x, y in zip(a[window], b[window])]
        return {"max": max(d), "mean": statistics.mean(d)}

    last = slice(-50, None)
    summary = {
        "noise floor: sdpa padded vs fa2 padded": {"all": gap(padded_sdpa, padded_fa2), "last 50": gap(padded_sdpa, padded_fa2, last)},
        "fa2 packed vs sdpa padded": {"all": gap(packed, padded_sdpa), "last 50": gap(packed, padded_sdpa, last)},
        "fa2 packed vs fa2 padded": {"all": gap(packed, padded_fa2), "last 50": gap(packed, padded_fa2, last)},
    }
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(0)}
    command = "python benchmarks/padding_free_train.py " + " ".join(sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"padding_free_train_seed{args.seed}.json"), "w") as f:
        json.dump({"command": command, "environment": env, "shape": SHAPE, "summary": summary,
                   "arms": arms}, f, indent=1)
    print(f"{command}\n{env}")
    print("| arm | backend | loss at step 1 | 50 | 150 | last | mean of last 50 | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for a in arms:
        l = a["losses"]
        print(f"| {a['arm']} | {a['backend']} | {l[0]:.4f} | {l[49]:.4f} | {l[149]:.4f} | {l[-1]:.4f} | "
              f"{statistics.mean(l[-50:]):.4f} | {a['seconds']:.1f} |")
    print("| curves compared | max abs loss gap | mean abs gap | max gap, last 50 | mean gap, last 50 |")
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['all']['max']:.4f} | {s['all']['mean']:.4f} | {s['last 50']['max']:.4f} | {s['last 50']['mean']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
