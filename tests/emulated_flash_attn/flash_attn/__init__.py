"""A CPU stand-in for flash-attn 2.8's Python API, for tests only (this machine has no GPU).

It computes what flash-attn computes (bottom-right causal alignment, sliding windows, GQA, variable
lengths, soft-capping) with plain torch ops, and refuses what the real kernel refuses: inputs that are
not float16/bfloat16 ("FlashAttention only support fp16 and bf16 data type", the CUDA extension's own
message). Every call is counted in ``CALLS``, so a test can tell FlashAttention-2 really ran.
"""

import collections

import torch

__version__ = "2.8.3"
CALLS = collections.Counter()


def _check(*tensors):
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")


def _attend(q, k, v, softmax_scale, causal, window_size, softcap):
    """One sequence: q (Sq, Hq, D), k/v (Sk, Hk, D) -> (Sq, Hq, D), computed in float32."""
    sq, hq, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    qf, kf, vf = (t.float().transpose(0, 1) for t in (q, k, v))  # (H, S, D)
    if hk != hq:
        kf = kf.repeat_interleave(hq // hk, dim=0)
        vf = vf.repeat_interleave(hq // hk, dim=0)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    rows = torch.arange(sq, device=q.device)[:, None] + (sk - sq)  # bottom-right alignment
    cols = torch.arange(sk, device=q.device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    left, right = window_size if window_size is not None else (-1, -1)
    if causal:
        right = 0
    if right >= 0:
        allowed &= cols <= rows + right
    if left >= 0:
        allowed &= cols >= rows - left
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, vf).transpose(0, 1).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    _check(q, k, v)
    CALLS["flash_attn_func"] += 1
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal, window_size, softcap) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    _check(q, k, v)
    CALLS["flash_attn_varlen_func"] += 1
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    parts = [_attend(q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]], softmax_scale, causal, window_size, softcap)
             for i in range(len(bq) - 1)]
    return torch.cat(parts, dim=0)


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the CPU stand-in has no paged kv-cache kernel")
