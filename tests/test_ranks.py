"""The cross-rank check (ranks.py) in one process: the message, and the init_process_group wrapper.

Two real ranks disagreeing are in test_multiprocess.py (torchrun, gloo, CPU).
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed import distributed_c10d

import panovlm_flashpatch


from panovlm_flashpatch.runtime.ranks import disagreement  # noqa: E402


def test_the_disagreement_message_names_ranks_and_reasons():
    got = {"model": {"role": "language model", "got": "flash_attention_2/bfloat16", "reason": "FlashAttention-2: ..."}}
    odd = {"model": {"role": "language model", "got": "sdpa/float32",
                     "reason": "FlashAttention-2 not used: flash-attn 2.8.3 is installed but its CUDA extension fails to import"}}
    message = disagreement("/ckpt", "Qwen3ForCausalLM", {0: got, 1: odd, 2: got, 3: got})
    assert message.startswith("ranks disagree on the attention backend of Qwen3ForCausalLM [/ckpt]: language model: "
                              "flash_attention_2/bfloat16 on ranks 0, 2, 3; sdpa/float32 on rank 1 (FlashAttention-2 not used: "
                              "flash-attn 2.8.3 is installed but its CUDA extension fails to import)")
    assert "DISABLE_FLASH_ATTN=1" in message
    assert disagreement("/ckpt", "Qwen3ForCausalLM", {0: got, 1: got}) is None


def test_apply_wraps_init_process_group_and_remove_restores_it():
    originals = dist.init_process_group, distributed_c10d.init_process_group
    assert panovlm_flashpatch.apply()
    assert dist.init_process_group is not originals[0]
    assert distributed_c10d.init_process_group is not originals[1]
    assert panovlm_flashpatch.apply()  # idempotent: wrapped once
    assert dist.init_process_group.__wrapped__ is originals[0]
    panovlm_flashpatch.remove()
    assert (dist.init_process_group, distributed_c10d.init_process_group) == originals
