"""Demo: load a tiny PanoLLaVA-like model set the way PanoLLaVA does, and print the backend report.

    python examples/demo.py            # table
    python examples/demo.py --json     # the same records as JSON

It builds three small random checkpoints in a temporary folder (nothing is downloaded):
a Qwen3-style language model, a SigLIP2-style vision encoder (SigLIP on transformers < 4.49) and a
LLaVA-style composite of the two; loads them through the real ``from_pretrained``, exactly as
PanoLLaVA's code does (including its explicit ``attn_implementation="sdpa"``), runs one forward
pass through the language model and the vision encoder, and prints which attention backend and dtype every component got, and why.

On a CPU machine every component stays on SDPA with the reason FlashAttention-2 was not used; on
a GPU of compute capability >= 8.0 with flash-attn installed, the language model gets
FlashAttention-2 in bf16.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile

import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM

import panovlm_flashpatch
from panovlm_flashpatch import tiny


def build(root: str) -> dict[str, str]:
    vision = "siglip2" if tiny.has_siglip2() else "siglip"
    return {
        "lm": tiny.build_lm(os.path.join(root, "qwen3-tiny")),
        "vision": (tiny.build_siglip2 if vision == "siglip2" else tiny.build_siglip)(os.path.join(root, f"{vision}-tiny")),
        "vlm": tiny.build_llava(os.path.join(root, "llava-tiny"), vision=vision),
    }


def load_like_panollava(paths: dict[str, str], device: str):
    # src/cora/model/language_model.py: the LM, with an explicit "sdpa" and no dtype.
    lm = AutoModelForCausalLM.from_pretrained(paths["lm"], attn_implementation="sdpa", trust_remote_code=True)
    # src/cora/model/vision_encoder.py: the whole SigLIP model, of which the vision tower is used.
    vision = AutoModel.from_pretrained(paths["vision"], trust_remote_code=True).vision_model
    vlm = transformers.LlavaForConditionalGeneration.from_pretrained(paths["vlm"])
    return lm.to(device).eval(), vision.to(device).eval(), vlm.to(device).eval()


@torch.no_grad()
def forward_once(lm, vision, device: str) -> None:
    lm_inputs = {k: v.to(device) for k, v in tiny.lm_inputs().items()}
    lm(**lm_inputs)
    pixels = tiny.pixel_inputs()["pixel_values"].to(device)
    vision_dtype = next(vision.parameters()).dtype
    vision_kwargs = {}
    params = inspect.signature(vision.forward).parameters
    if "spatial_shapes" in params:  # SigLIP2 takes patches, a patch mask and each image's patch grid
        patches = pixels.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(pixels.shape[0], 16, -1)
        # The mask is "attention_mask" on the vision transformer of 4.5x, "pixel_attention_mask" elsewhere.
        mask_name = "pixel_attention_mask" if "pixel_attention_mask" in params else "attention_mask"
        vision_kwargs = {
            "pixel_values": patches.to(vision_dtype),
            mask_name: torch.ones(pixels.shape[0], 16, dtype=torch.long, device=device),
            "spatial_shapes": torch.tensor([[4, 4]] * pixels.shape[0], device=device),
        }
    else:
        vision_kwargs = {"pixel_values": pixels.to(vision_dtype)}
    vision(**vision_kwargs)


def print_table(records: list[dict]) -> None:
    rows = [("checkpoint", "role", "class", "backend", "dtype", "why")]
    for r in records:
        rows.append((os.path.basename(r["checkpoint"]), r["role"], r["class"], r["backend"], str(r["dtype"]), r["reason"]))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 3)
    print("\nper phase (what each kind of forward runs, and why; report(model)[i]['by_phase']):")
    for r in records:
        for phase, choice in (r.get("by_phase") or {}).items():
            print(f"  {r['role']:<16} {phase:<26} {choice['backend']:<30} {choice['why'][:110]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report records as JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()  # keep the demo's output to our report
    transformers.logging.disable_progress_bar()
    applied = panovlm_flashpatch.apply()  # a no-op when automatic activation already applied it
    print(f"panovlm_flashpatch {panovlm_flashpatch.__version__} applied={applied}; transformers {transformers.__version__}, "
          f"torch {torch.__version__}, device {args.device}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="panovlm_demo_") as root:
        paths = build(root)
        panovlm_flashpatch.clear_report()
        lm, vision, vlm = load_like_panollava(paths, args.device)
        forward_once(lm, vision, args.device)
        records = panovlm_flashpatch.report()
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print()
        print_table(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
