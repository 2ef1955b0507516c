"""Packed training forwards without flash-attn: torch's own variable-length flash kernel.

Why: a packed row on SDPA needs a (1, 1, T, T) block-diagonal mask to keep its sequences apart, and with a mask
SDPA cannot run its flash kernel (it takes the memory-efficient one). torch ships the FlashAttention-2 kernel
itself, callable on packed rows as ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10). Measured on the H200
(benchmarks/attention_kernels.py, a packed row of 8 sequences, 4,340 tokens, fwd+bwd per layer): torch's varlen
0.76 ms, flash-attn's varlen 0.61, SDPA on the same sequences padded (8 x 912) 1.26; SDPA with the block mask
on the packed row was not timed alone. So where flash-attn is missing, a padded training
forward packed by padding_free.py runs its attention here, and users who never manage to install flash-attn get
the packing gain too.

How: :func:`attention` is registered with transformers' ``AttentionInterface`` under :data:`KEY` (a new key: no
model the plugin did not arm ever names it). At its first packed forward padding_free.py puts the language model's
config on the key (:func:`engage`) and hands the sequence boundaries over as transformers' ``cu_seq_lens_*`` /
``max_length_*`` arguments, which reach every attention call. The key stays until ``remove()``, or until code
that accepts only the names it knows takes the model (readers.py: continuous batching): it behaves as SDPA
exactly outside a packed forward of ours. Its mask function builds SDPA's mask unless this thread is inside a packed
forward (:func:`packing`), and its attention function hands any call that carries a mask or no boundaries to SDPA's.
So what a layer computes depends only on its own arguments: the recompute of gradient checkpointing (any kind, run
in the backward after the forward returned, after other forwards of the model perhaps) gets the forward's arguments
again (no mask, the same boundaries), and a forward in another thread, or of a ``DataParallel`` replica sharing the
config, gets its own. Readers of the backend (the report, the SDPA kernel order) see "sdpa" (:func:`public`); a copy
or a pickle of the config carries "sdpa" too (portable.py), so it runs where the plugin is not.

A forward whose attention this kernel cannot compute exactly as SDPA would (dropout in training, an old varlen
signature without the scale or window the layer asks for) is computed per sequence with plain torch ops instead,
and says so once: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import weakref

import torch

from .. import reporting
from ..compat import autocast_half_dtype

KEY = "panovlm_varlen"
#: The argument a packed call of ours carries down to every attention call (as transformers carries ``cu_seq_lens``):
#: the layer runs the kernel whatever mask was built, so a recompute that rebuilds one (checkpointing around the
#: whole decoder, in the backward, outside the packed forward) computes what the forward computed.
MARKER = "panovlm_packed"
SDPA = "sdpa"
HALF = (torch.float16, torch.bfloat16)
#: Device types whose tensors torch's varlen kernel takes (tests add "cpu" for their CPU stand-in kernel).
DEVICES = ("cuda",)
#: flash kernels' head-dimension limit (torch's flash forward refuses larger heads).
MAX_HEAD_DIM = 256

_local = threading.local()  # .depth > 0: inside a packed forward of ours, in this thread
_engaged: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()  # configs put on the key


def kernel():
    """torch's ``varlen_attn``, or None where this torch has none (read per call: tests swap it)."""
    try:
        from torch.nn.attention import varlen as module
    except ImportError:
        return None
    return getattr(module, "varlen_attn", None)


@functools.lru_cache(maxsize=8)
def _parameters(function) -> frozenset:
    try:
        return frozenset(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return frozenset()


def machine_reason(caps) -> str | None:
    """None when this process can run torch's varlen kernel at all (a CUDA GPU of sm >= 8.0, a torch that has it)."""
    if kernel() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10 has)"
    capability = getattr(caps, "capability", None)
    if capability is None:
        return "torch's varlen kernel needs a CUDA GPU, found none visible to torch"
    if tuple(capability) < (8, 0):
        return f"torch's varlen kernel needs a CUDA GPU of sm >= 8.0, found sm_{capability[0]}{capability[1]}"
    return None


def model_reason(config) -> str | None:
    """None when the varlen kernel computes this language model's attention as SDPA does (static: its config)."""
    if getattr(config, "attn_logit_softcapping", None):
        return "its attention soft-caps the logits, which torch's varlen kernel cannot"
    if getattr(config, "attention_dropout", 0.0):
        return f"its attention dropout ({config.attention_dropout}) is not in torch's varlen kernel"
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if head_dim is not None and (head_dim > MAX_HEAD_DIM or head_dim % 8):
        return f"its head dimension {head_dim} is not one torch's flash kernel takes (a multiple of 8, at most 256)"
    return None


def forward_reason(model) -> str | None:
    """None when this forward of ``model`` can run the kernel: its weights on a GPU, in half precision (or autocast)."""
    try:
        weight = next(model.parameters())
    except StopIteration:
        return "the model has no parameters"
    if weight.device.type not in DEVICES:
        return "its weights are not on a CUDA GPU"
    if weight.dtype not in HALF and autocast_half_dtype(weight.device.type) is None:
        return f"its weights are {str(weight.dtype).replace('torch.', '')} outside autocast (the kernel takes float16/bfloat16)"
    if weight.device.type == "cuda":
        if not torch.backends.cuda.flash_sdp_enabled():
            return "torch's flash kernel is switched off in this process (torch.backends.cuda.enable_flash_sdp(False))"
        if _capability(weight.device.index) < (8, 0):  # a machine of mixed GPUs: this model's own GPU
            return "its GPU is older than sm_80, which torch's flash kernel needs"
    return None


@functools.lru_cache(maxsize=16)
def _capability(index) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))



# --- the key, registered once --------------------------------------------------------------------------------

#: (the attention-function and mask-function interfaces of transformers), once :func:`register` ran
_registered: list = []


def register() -> bool:
    """Registers :data:`KEY` with transformers' attention and mask interfaces (idempotent); False where it cannot."""
    if _registered:
        return True
    try:
        from transformers import masking_utils
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(KEY, attention)
    masking_utils.AttentionMaskInterface.register(KEY, _mask)
    # Looked up by name at each call: whatever "sdpa" names then (a function someone registered over transformers').
    _registered[:] = [ALL_ATTENTION_FUNCTIONS, masking_utils.ALL_MASK_ATTENTION_FUNCTIONS]
    return True


def _mask(*args, **kwargs):
    """Inside a packed forward of ours: no mask (the boundaries travel as ``cu_seq_lens``); else SDPA's mask."""
    if getattr(_local, "depth", 0) > 0:
        return None
    return _registered[1][SDPA](*args, **kwargs)


def public(backend):
    """The backend as the caller knows it: :data:`KEY` is SDPA (with packed forwards on torch's varlen kernel)."""
    return SDPA if backend == KEY else backend


def engage(config) -> None:
    """Puts ``config`` (a language model's, on SDPA) on :data:`KEY` for good: until ``remove()`` (:func:`disengage`)."""
    values = config.__dict__
    if values.get("_attn_implementation_internal") == SDPA:  # portable.py, installed at arming: copies carry "sdpa"
        values["_attn_implementation_internal"] = KEY
        _engaged[id(config)] = config


def _configs_on_key(model):
    for module in model.modules():
        config = getattr(module, "config", None)
        values = getattr(config, "__dict__", None)
        if isinstance(values, dict) and values.get("_attn_implementation_internal") == KEY:
            yield config


def busy(model) -> bool:
    """A packed step of ``model`` is in flight: a packed forward running (in any thread), or one whose backward has
    not finished (gradient checkpointing recomputes its layers there, and they must find the key)."""
    with _busy_lock:
        return any(_busy.get(id(config)) for config in _configs_on_key(model))


def release(model) -> bool:
    """Puts every config of ``model`` that is on :data:`KEY` back on SDPA (True if one was), unless a packed step is in
    flight (:func:`busy`: then nothing, and False); its next packed training forward puts it on the key again. For
    code that requires the name "sdpa" (readers.py): outside a packed step the key computes what SDPA computes, so
    only the name changes."""
    released = False
    with _busy_lock:
        for config in list(_configs_on_key(model)):
            if _busy.get(id(config)):
                continue
            config.__dict__["_attn_implementation_internal"] = SDPA
            _engaged.pop(id(config), None)
            released = True
    return released


def disengage() -> None:
    """``remove()``: every config still on the key goes back to SDPA (the models then run as plain transformers)."""
    for config in list(_engaged.values()):
        values = config.__dict__
        if values.get("_attn_implementation_internal") == KEY:
            values["_attn_implementation_internal"] = SDPA
    _engaged.clear()


@contextlib.contextmanager
def packing(config=None):
    """This thread is inside a packed forward (the key's mask function builds no mask); ``config``'s step is in
    flight meanwhile (:func:`busy`)."""
    _local.depth = getattr(_local, "depth", 0) + 1
    if config is not None:
        _hold(id(config))
    try:
        yield
    finally:
        _local.depth -= 1
        if config is not None:
            _free(id(config))


def until_backward(config, tensor) -> None:
    """Keeps ``config``'s step in flight until the backward through ``tensor`` has finished (the end of that autograd
    pass, where checkpointing's last recompute is done), or until ``tensor`` is gone (no backward can come)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return
    key, done = id(config), []

    def free():
        if not done:
            done.append(True)
            _free(key)

    def at_backward(grad):
        try:
            torch.autograd.Variable._execution_engine.queue_callback(free)  # runs when this backward pass ends
        except RuntimeError:  # not inside an autograd pass (a hook called by hand)
            free()

    _hold(key)
    tensor.register_hook(at_backward)
    weakref.finalize(tensor, free)


_busy: dict[int, int] = {}  # id(config) -> packed steps in flight (see busy())
_busy_lock = threading.Lock()


def _hold(key: int) -> None:
    with _busy_lock:
        _busy[key] = _busy.get(key, 0) + 1


def _free(key: int) -> None:
    with _busy_lock:
        left = _busy.get(key, 0) - 1
        if left > 0:
            _busy[key] = left
        else:
            _busy.pop(key, None)


# --- the attention function ----------------------------------------------------------------------------------

def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
              softcap=None, **kwargs):
    """transformers' attention-function interface: ``(batch, heads, length, dim)`` in, ``(batch, length, heads, dim)``
    and no weights out."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    ours = kwargs.pop(MARKER, False)
    if (attention_mask is not None and not ours) or cu_q is None or query.shape[0] != 1:
        return _registered[0][SDPA](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    sliding_window=sliding_window, softcap=softcap, **kwargs)
    cu_k = cu_q if cu_k is None else cu_k
    max_q = kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max())
    max_k = kwargs.get("max_length_k") or max_q
    head_dim = query.shape[-1]
    scale = scaling if scaling is not None else head_dim ** -0.5
    causal = kwargs.get("is_causal")  # transformers 5 hands config.is_causal=False down as is_causal
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    left = sliding_window - 1 if sliding_window else -1
    q, k, v = (t.transpose(1, 2).reshape(t.shape[2], t.shape[1], head_dim) for t in (query, key, value))
    half = autocast_half_dtype(q.device.type)
    if half is not None and not _one_half_dtype(q, k, v):
        # Under autocast SDPA's inputs are cast to its half dtype; torch's varlen op has no autocast rule, and a model's
        # own norms hand it float32 queries beside bfloat16 values (Qwen3's q_norm): cast as autocast would.
        q, k, v = q.to(half), k.to(half), v.to(half)
    function = kernel()
    params = _parameters(function) if function is not None else frozenset()
    why = _kernel_gap(params, dropout if module.training else 0.0, softcap, scale, head_dim, causal, left)
    if why is None and not _one_half_dtype(q, k, v):
        why = f"inputs of {q.dtype}/{k.dtype}/{v.dtype} outside autocast (the kernel takes one of float16/bfloat16)"
    if why is None:
        call = {}
        if "scale" in params:
            call["scale"] = scale
        if "window_size" in params:
            call["window_size"] = (left, 0) if causal else (-1, -1)
        elif causal:
            call["is_causal"] = True
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                call["enable_gqa"] = True
            else:  # this torch's kernel takes as many key/value heads as query heads
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        try:
            return function(q, k, v, cu_q, cu_k, max_q, max_k, **call).unsqueeze(0), None
        except (TypeError, ValueError) as exc:  # refused before any launch: its signature misread (a wrapper hiding it)
            reporting.log_once(f"varlen-refused:{type(exc).__name__}", logging.WARNING,
                               f"padding-free: torch's varlen kernel refused the packed call ({type(exc).__name__}: "
                               f"{exc}); its attention is computed per sequence with torch ops instead (exact, slower). "
                               "PANOVLM_FLASHPATCH_PADDING_FREE=0 keeps training forwards padded.")
    else:
        reporting.log_once(f"varlen-exact:{why}", logging.WARNING,
                           f"padding-free: packed attention computed per sequence with torch ops, exact and slower "
                           f"({why}); PANOVLM_FLASHPATCH_PADDING_FREE=0 keeps training forwards padded")
    out = _per_sequence(q, k, v, cu_q, cu_k, scale, causal, left, dropout if module.training else 0.0, softcap)
    return out.unsqueeze(0), None


def _one_half_dtype(q, k, v) -> bool:
    """One dtype for all three, a half-precision one: what torch's flash kernel takes."""
    return q.dtype in HALF and q.dtype == k.dtype == v.dtype


def _kernel_gap(params, dropout, softcap, scale, head_dim, causal, left) -> str | None:
    """Why torch's kernel (as this torch's signature has it) cannot compute this call exactly, or None."""
    if not params:
        return "this torch has no varlen kernel"
    if dropout:
        return "attention dropout in training"
    if softcap:
        return "soft-capped logits"
    if "scale" not in params and abs(scale - head_dim ** -0.5) > 1e-12:
        return "this torch's varlen kernel takes no scale, and the layer asks for one of its own"
    if left >= 0 and "window_size" not in params:
        return "this torch's varlen kernel takes no sliding window"
    if not causal and left >= 0:
        return "a sliding window on a layer that is not causal"
    if "window_size" not in params and "is_causal" not in params:
        return "this torch's varlen kernel cannot be told whether the attention is causal"
    return None


def _per_sequence(q, k, v, cu_q, cu_k, scale, causal, left, dropout, softcap):
    """The exact computation, one sequence at a time (float32 scores): the fallback for what the kernel cannot do."""
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    groups = q.shape[1] // k.shape[1]
    for i in range(len(bounds_q) - 1):
        (a, b), (c, d) = bounds_q[i:i + 2], bounds_k[i:i + 2]
        if b == a:
            continue
        qi = q[a:b].transpose(0, 1).float()
        ki = k[c:d].transpose(0, 1).float().repeat_interleave(groups, dim=0)
        vi = v[c:d].transpose(0, 1).float().repeat_interleave(groups, dim=0)
        scores = (qi @ ki.transpose(1, 2)) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        rows = torch.arange(b - a, device=q.device)[:, None] + (d - c) - (b - a)
        cols = torch.arange(d - c, device=q.device)[None, :]
        keep = torch.ones_like(scores[0], dtype=torch.bool)
        if causal:
            keep &= cols <= rows
        if left >= 0:
            keep &= (rows - cols <= left) & (causal or (cols - rows <= left))
        weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        if dropout:
            weights = torch.nn.functional.dropout(weights, p=dropout)
        out[a:b] = (weights @ vi).transpose(0, 1).to(q.dtype)
    return out
