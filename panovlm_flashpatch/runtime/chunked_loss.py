"""The loss of a packed training forward, from the last hidden states a chunk of tokens at a time (``loss_only``).

Why: the largest activation of a causal LM with a large vocabulary is its logits. For a 152k-token
vocabulary and a packed row of 7,000 tokens, transformers' loss holds the bf16 logits (2 GiB), their float32
copy (4 GiB) and the log-softmax it saves for the backward (4 GiB), then a float32 gradient of the same size:
a third of the peak of a 0.6B model's training step. A caller who asked for ``padding_free="loss_only"`` reads
only the loss, so the full logits need never exist. Here they do not: the model runs its own forward without
labels while its output layer computes nothing (a pre-hook hands it zero tokens and keeps the hidden states it
was given), then :func:`loss` computes the same loss as transformers' ``ForCausalLMLoss`` chunk by chunk,
keeping one float per token (the log-sum-exp); its backward computes each chunk's logits again and their
gradient from them (one more matmul of the output layer per step; liger-kernel instead computes the gradient in
the forward, in chunks of 32-64 tokens for this vocabulary, each a pass over the whole weight: README measures both).

What it must equal: the padded (and the packed) run of transformers' own loss. Same shift (each token predicts
the next, -100 ignored), the same reduction (the mean over counted tokens, or the sum over
``num_items_in_batch``), float32 from the logits on, Gemma 2/3's final soft-capping inside the chunk, the
gradient cast to the compute dtype before the two matmuls as autograd does in the unchunked run (so an fp16
loss scaler's factor is applied first, as there). tests/test_chunked_loss.py checks it family by family.

Used only where that can be shown (``model_reason`` at the load, ``call_reason`` per forward): the model's
forward is transformers' own and calls ``self.loss_function``, which is ``ForCausalLMLoss``; the output layer is
a plain ``nn.Linear`` that nothing else hooks, wraps or shards (accelerate's device-map hooks, an FSDP unit around
it, DeepSpeed ZeRO-3, a PEFT wrapper, a probe of the caller's keep the loss unchunked, and the log says why), and no
``torch.func`` transform is active. Elsewhere ``loss_only`` only drops the logits, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading

import torch
import torch.nn.functional as F

from .. import _safety, reporting
from ..compat import autocast_half_dtype

IGNORE_INDEX = -100
#: Float32 logits of one chunk, in bytes: 1 GiB is ~1,700 tokens of a 152k vocabulary, large enough that the
#: output layer's matmuls stay efficient, small beside the 7-10 GiB the unchunked loss holds.
CHUNK_BYTES = 1 << 30


def _innermost(function):
    try:
        return inspect.unwrap(function)
    except ValueError:  # a cycle of __wrapped__
        return function


def model_reason(model, forward, lm_config) -> str | None:
    """Why this model's packed loss cannot be computed in chunks (None: it can). Host-side, once per load.

    ``forward``: the class's original forward (under the plugin's wrapper); ``lm_config``: its language model's."""
    inner = _innermost(forward)
    module = getattr(inner, "__module__", "") or ""
    code = getattr(inner, "__code__", None)
    if not module.startswith("transformers.") or code is None:
        return (f"{type(model).__name__}.forward is not transformers' own ({module or 'unknown'}.{inner.__name__}): "
                "its loss is left to it")
    if "loss_function" not in code.co_names:
        return f"{type(model).__name__}.forward computes its loss by its own code, not with self.loss_function"
    if "pretraining_tp" in code.co_names and (getattr(lm_config, "pretraining_tp", 1) or 1) > 1:
        return "its pretraining_tp > 1 computes the logits from slices of the output layer's weight, not by calling it"
    why = _loss_reason(model)
    if why:
        return why
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"its output layer is {type(head).__name__}, not a plain torch.nn.Linear"
    vocab = getattr(lm_config, "vocab_size", None)
    if vocab is not None and head.weight.shape[0] != vocab:
        return f"its output layer has {head.weight.shape[0]} rows for a vocabulary of {vocab}"
    return None


def _loss_reason(model) -> str | None:
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss

        function = model.loss_function  # read per forward: 4.57+ let a caller set it, 4.46 reads config.loss_type
    except Exception as exc:  # noqa: BLE001 - an unknown loss type: leave it to the model
        return f"its loss function could not be read ({type(exc).__name__}: {exc})"
    if function is not ForCausalLMLoss:
        return (f"its loss function is {getattr(function, '__name__', function)!r}, not transformers' ForCausalLMLoss "
                "(a loss set on the model is left to it)")
    return None


def reads_softcap(forward) -> bool:
    """The forward applies ``cap * tanh(logits / cap)`` with ``config.final_logit_softcapping`` (Gemma 2 and 3):
    the chunks must too, with the value the config holds at that forward."""
    code = getattr(_innermost(forward), "__code__", None)
    return code is not None and "final_logit_softcapping" in code.co_names


def _global_hooks() -> bool:
    module = torch.nn.modules.module
    return any(getattr(module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _functorch_active() -> bool:
    """Inside ``torch.func.grad``/``vmap``/...: an autograd.Function without ``setup_context`` cannot run there."""
    try:
        return bool(torch._C._are_functorch_transforms_active())
    except AttributeError:
        return False


#: Ids of the pre-hooks open Captures put on output layers (another thread's chunked forward of the same model).
_OURS: set[int] = set()


def call_reason(model) -> str | None:
    """Why this forward's loss cannot be computed in chunks (None: it can). Host-side, every forward: a loss function,
    hooks or a wrapper can be set on the model after its load."""
    why = _loss_reason(model)
    if why:
        return why
    if _functorch_active():
        return "it runs under a torch.func transform (grad, vmap, ...)"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"its output layer is now {type(head).__name__} (wrapped after the load?), not a plain torch.nn.Linear"
    if (head._forward_hooks or [k for k in head._forward_pre_hooks if k not in _OURS] or head._backward_hooks
            or getattr(head, "_backward_pre_hooks", None)):
        return ("its output layer has hooks (an FSDP unit or DeepSpeed ZeRO-3 around it, PEFT, or the caller's own), "
                "which would not see the logits")
    if _global_hooks():
        return "module hooks are registered for every module (torch.nn.modules.module), which would not see the logits"
    if hasattr(head, "_hf_hook") or "forward" in head.__dict__:
        return "its output layer's forward is replaced (accelerate's device-map hooks?)"
    weight = head.weight
    if type(weight).__name__ == "DTensor" or weight.numel() == 0 or weight.device.type == "meta":
        return "its output layer's weight is sharded or not materialised here"
    return None


def forward(model, run, packed_call: dict, config, softcapped: bool):
    """A packed training forward with labels (padding_free.py): ``run(arguments)`` without labels, the output layer
    computing nothing; the loss from its input, chunked. ``config``: the language model's."""
    try:
        why = call_reason(model)
    except Exception as exc:  # a bug of ours costs the chunking, never the step
        _safety.absorb("checking the chunked loss", exc, "the loss was computed by the model")
        return run(packed_call)
    if why:
        _unchunked(model, why)
        return run(packed_call)
    head = model.get_output_embeddings()
    arguments = {k: v for k, v in packed_call.items() if k != "labels"}
    labels, items = packed_call["labels"], packed_call.get("num_items_in_batch")
    try:
        decoder = model.get_decoder()
    except Exception:  # noqa: BLE001 - then the head's first call is the one captured
        decoder = None
    with Capture(head, decoder if isinstance(decoder, torch.nn.Module) else None) as capture:
        output = run(arguments)
    if capture.hidden is not None:
        cap = getattr(config, "final_logit_softcapping", None) if softcapped else None  # the value of this forward
        value = loss(capture.hidden, head, labels, items, cap)
    elif getattr(output, "logits", None) is not None and output.logits.shape[-2] == labels.shape[-1]:
        # The head was not called as expected after the decoder, so the logits were computed in full: the model's
        # own loss of them is what it would have returned (no second forward).
        _unchunked(model, "its output layer was not called once with the hidden states after the decoder")
        extra = {} if items is None else {"num_items_in_batch": items}
        value = model.loss_function(logits=output.logits, labels=labels, vocab_size=config.vocab_size, **extra)
    else:  # nothing to compute the loss from: the forward once more, with its labels (the first graph let go)
        _unchunked(model, "neither the hidden states nor the logits of the forward could be read (ran it again)")
        del output
        return run(packed_call)
    # Rebuilt, not assigned: a field set after construction goes last in to_tuple(), and the loss comes first there.
    fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    fields["loss"] = value
    return type(output)(**fields)


def _unchunked(model, message: str) -> None:
    reporting.log_once(f"chunked-loss:{type(model).__name__}:{message}", reporting.info_level(),
                       f"padding-free: {type(model).__name__}'s packed loss is computed by the model, unchunked: "
                       f"{message}")


class Capture:
    """While active, the output layer's first call after the decoder returned computes nothing and keeps the hidden
    states it was given: the call of the model's own head (a probe calling the head from inside the decoder, a
    logit lens, gets real logits, as without the plugin).

    The hooks act only for the thread that opened the capture (another thread's forward of the same model computes
    its logits as usual), and only once."""

    def __init__(self, head, decoder):
        self.head, self.decoder = head, decoder
        self.hidden = None
        self._ready = decoder is None  # no decoder to wait for: the head's first call
        self._owner = threading.get_ident()
        self._handles = []

    def _decoder_done(self, module, args, output):
        if threading.get_ident() == self._owner:
            self._ready = True

    def _head(self, module, args):
        if threading.get_ident() != self._owner or not self._ready or self.hidden is not None:
            return None
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            self._ready = False  # a call we do not know: computed as it is, and nothing captured
            return None
        self.hidden = args[0]
        return (args[0][..., :0, :],)  # zero tokens: logits of shape (..., 0, vocab), nothing computed

    def __enter__(self):
        self._handles = [self.head.register_forward_pre_hook(self._head)]
        _OURS.add(self._handles[0].id)
        if self.decoder is not None:
            self._handles.append(self.decoder.register_forward_hook(self._decoder_done))
        return self

    def __exit__(self, *exc):
        _OURS.discard(self._handles[0].id)
        for handle in self._handles:
            handle.remove()
        return False


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(1, vocab)))


def loss(hidden, head, labels, num_items_in_batch=None, softcap=None):
    """transformers' ``ForCausalLMLoss(head(hidden), labels, ...)``, never holding more than one chunk's logits.

    ``hidden``: (..., T, H), the output layer's input; ``labels``: (..., T), unshifted (-100 ignored)."""
    weight, bias = head.weight, head.bias
    flat = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.to(flat.device)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    if num_items_in_batch is None:
        denominator = (targets != IGNORE_INDEX).sum()  # a tensor: no host sync
    else:
        denominator = num_items_in_batch.to(flat.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    device_type = flat.device.type
    compute = autocast_half_dtype(device_type) or weight.dtype
    return _ChunkedCrossEntropy.apply(flat, weight, bias, targets, denominator, softcap, compute, device_type,
                                      chunk_rows(weight.shape[0]))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat, weight, bias, targets, denominator, softcap, compute, device_type, rows):
        with _without_autocast(device_type):
            w = weight.to(compute)
            b = bias.to(compute) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=flat.device)
            lse = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
            for start in range(0, flat.shape[0], rows):
                h, t = flat[start:start + rows].to(compute), targets[start:start + rows]
                logits, _ = _logits(h, w, b, softcap)
                lse[start:start + rows] = torch.logsumexp(logits, dim=-1)
                valid = t != IGNORE_INDEX
                # Ignored rows read column 0 and are masked out; any other bad label fails in gather, as in torch's loss.
                picked = logits.gather(1, t.masked_fill(~valid, 0)[:, None]).squeeze(1)
                # where, not a product: an ignored row's non-finite logits must not reach the sum (torch's loss skips it)
                total += torch.where(valid, lse[start:start + rows] - picked, 0).sum()
                del logits, picked
        ctx.save_for_backward(flat, weight, bias, targets, lse)
        ctx.denominator, ctx.softcap, ctx.compute, ctx.device_type, ctx.rows = (denominator, softcap, compute,
                                                                                device_type, rows)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        flat, weight, bias, targets, lse = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        # create_graph=True (a penalty on these gradients): out-of-place ops, lse recomputed, so autograd can differentiate
        graph = torch.is_grad_enabled()
        scale = grad_output.float() / ctx.denominator  # the chain rule's factor, applied before the cast as autograd does
        parts_h = []
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        several = flat.shape[0] > ctx.rows
        with _without_autocast(ctx.device_type):
            w = weight.to(ctx.compute)
            b = bias.to(ctx.compute) if bias is not None else None
            for start in range(0, flat.shape[0], ctx.rows):
                h, t = flat[start:start + ctx.rows].to(ctx.compute), targets[start:start + ctx.rows]
                valid = t != IGNORE_INDEX
                logits, capped = _logits(h, w, b, ctx.softcap, inplace=not graph)
                # d loss / d logits = (softmax - one_hot(target)) * scale on counted rows, exactly 0 on the others
                # (masked, not multiplied: with no counted row scale is inf, and 0 * inf would be NaN).
                if graph:
                    grad = torch.exp(logits - torch.logsumexp(logits, dim=-1, keepdim=True))
                    grad = grad - F.one_hot(t.masked_fill(~valid, 0), grad.shape[-1]).to(grad.dtype)
                    grad = torch.where(valid[:, None], grad * scale, torch.zeros((), dtype=grad.dtype, device=grad.device))
                    if capped is not None:
                        grad = grad * (1 - capped * capped)
                else:
                    grad = logits.sub_(lse[start:start + ctx.rows, None]).exp_()
                    grad.scatter_add_(1, t.masked_fill(~valid, 0)[:, None], -valid.to(grad.dtype)[:, None])
                    grad.mul_(scale).masked_fill_(~valid[:, None], 0)
                    if capped is not None:  # logits = cap * tanh(z / cap): d/dz = 1 - tanh^2
                        grad.mul_(capped.mul_(capped).neg_().add_(1))
                del capped, logits
                grad = grad.to(ctx.compute)
                if want_h:
                    parts_h.append(grad @ w)
                if want_w:
                    part = grad.t() @ h
                    grad_w = part if not several else (grad_w + part if graph else grad_w.add_(part))
                if want_b:
                    grad_b = grad_b + grad.float().sum(0)
                del grad
        grad_h = torch.cat(parts_h) if want_h else None

        def cast(g, like):
            return g.to(like.dtype) if g is not None and like is not None else None

        return cast(grad_h, flat), cast(grad_w, weight), cast(grad_b, bias), None, None, None, None, None, None


def _without_autocast(device_type: str):
    """Autocast off for the explicit casts here, entered only where it is on: torch < 2.5 refuses an autocast
    context for some devices (``mps``) even to disable it."""
    return torch.autocast(device_type, enabled=False) if autocast_half_dtype(device_type) else contextlib.nullcontext()


def _logits(h, w, b, softcap, inplace=True):
    """One chunk's float32 logits (soft-capped where the model caps them), and tanh(z / cap) for the backward.

    The cap is applied in float32 (transformers applies it in the model's dtype, then casts: bf16 rounding apart,
    the same function)."""
    logits = F.linear(h, w, b).float()
    if softcap is None:
        return logits, None
    capped = logits.div_(softcap).tanh_() if inplace else torch.tanh(logits / softcap)
    return capped * softcap, capped
