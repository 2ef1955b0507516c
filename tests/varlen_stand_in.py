"""torch's varlen attention kernel on the CPU, for tests: the real path of runtime/varlen.py with a stand-in kernel.

``torch.nn.attention.varlen.varlen_attn`` runs torch's CUDA flash kernel, which this machine cannot run. So two
things are faked, and only these: the plugin's capability probe (a GPU of sm_90, flash-attn absent) and the kernel
(a look-alike with the signature of a given torch release that computes attention per sequence in float64, and
takes float32 too so that the equivalence tests can be exact). Everything else is real: the load, the packing, the
registration with transformers' attention interface, transformers' layers handing the boundaries over.
"""

from __future__ import annotations

import torch

CALLS = []  # one entry per kernel call: (tokens, query heads, key heads, window_size or is_causal)


def _attend(query, key, value, cu_seq_q, cu_seq_k, scale, left, right):
    if query.shape[1] != key.shape[1]:
        key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    out = torch.zeros_like(query, dtype=torch.float64)
    bq, bk = cu_seq_q.tolist(), cu_seq_k.tolist()
    for i in range(len(bq) - 1):
        q = query[bq[i]:bq[i + 1]].transpose(0, 1).double()
        k = key[bk[i]:bk[i + 1]].transpose(0, 1).double()
        v = value[bk[i]:bk[i + 1]].transpose(0, 1).double()
        scores = q @ k.transpose(1, 2) * scale
        rows = torch.arange(q.shape[1])[:, None] + k.shape[1] - q.shape[1]
        cols = torch.arange(k.shape[1])[None, :]
        keep = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
        if right >= 0:
            keep &= cols - rows <= right
        if left >= 0:
            keep &= rows - cols <= left
        out[bq[i]:bq[i + 1]] = (torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v).transpose(0, 1)
    return out.to(query.dtype)


def _check(query, key, value):
    """As the real kernel: one dtype for all three (float32 accepted here only, for exact comparisons)."""
    if len({query.dtype, key.dtype, value.dtype}) > 1 or query.dtype not in (torch.float16, torch.bfloat16,
                                                                              torch.float32):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type, with query, key and value alike")


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    """torch 2.11's signature: causal as ``window_size=(-1, 0)``, no GQA argument (key heads must match)."""
    _check(query, key, value)
    if query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads")
    CALLS.append((query.shape[0], query.shape[1], key.shape[1], tuple(window_size)))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _attend(query, key, value, cu_seq_q, cu_seq_k, scale, *window_size)


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.12+'s signature: ``enable_gqa`` lets key/value have fewer heads."""
    _check(query, key, value)
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads")
    CALLS.append((query.shape[0], query.shape[1], key.shape[1], tuple(window_size)))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _attend(query, key, value, cu_seq_q, cu_seq_k, scale, *window_size)


def activate(monkeypatch, caps, kernel=varlen_attn_2_13):
    """Makes torch's varlen kernel runnable on this CPU until the test ends (flash-attn stays absent)."""
    from torch.nn.attention import varlen as torch_varlen

    from panovlm_flashpatch import probe as probe_module
    from panovlm_flashpatch.runtime import varlen

    CALLS.clear()
    monkeypatch.setattr(torch_varlen, "varlen_attn", kernel, raising=False)
    monkeypatch.setattr(varlen, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(varlen, "HALF", (torch.float16, torch.bfloat16, torch.float32))  # the stand-in takes float32
    absent = caps(flash_attn_version=None, flash_attn_error="flash-attn is not installed")
    monkeypatch.setattr(probe_module, "probe", lambda devices=None: absent)
    return CALLS
