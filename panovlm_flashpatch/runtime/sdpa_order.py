"""SDPA with its flash kernel first, for the forwards of a new shape, in the models the plugin loaded.

Why: on Hopper and newer, torch (>= 2.9 with cuDNN > 9.15) tries cuDNN's attention before its own flash kernel,
and cuDNN builds an execution plan for every new shape (up to seconds each). Training with dynamic padding, or at
batch 1 with varying lengths, makes a new shape nearly every step: on the H200 plain transformers ran batch 8 with
dynamic padding at 16k real tokens/s against 21.5k with the flash kernel first, and batch 1 (lengths 1200-1600) at
6.5k against 13k (benchmarks/results/workloads). Once a shape's plan is cached cuDNN is the faster kernel, so a
forward whose input has the shape of that module's last ``STEADY - 1`` forwards keeps torch's own order (a fixed
shape: cuDNN from its 4th forward on). Not from the first repeat: a varying-length run repeats a shape now and then
(batch 1, lengths 1200-1600: one step in ~400), and that one repeat then paid a plan build (a 2.8 s step on the
H200, benchmarks/results/workloads call 6, the first cuDNN call of the process) to save ~0.3 ms per layer.

One unpadded row: for a training forward of batch 1 without padding (PanoLLaVA's finetune stage: about 1,400
tokens, batch 1), SDPA with its flash kernel first ran 1.2x faster than FlashAttention-2 on the H200 (15.1k against
12.6k real tokens/s; flash-attn's own kernel is the slower one at that shape: 0.46 against 0.30 ms fwd+bwd at
1 x 1536), so an FA2 component armed here runs such forwards on its SDPA fallback (runtime/dispatch.py asks
:func:`one_unpadded_row`). Measured on sm_90 only: other GPUs keep FlashAttention-2 for them; so do classes without SDPA or with attention
soft-capping (Gemma 2), and models with gradient checkpointing (below).

Gradient checkpointing: the recompute of a checkpointed layer runs during the backward, outside the forward's
window, on torch's order: on Hopper cuDNN, where the forward ran the flash kernel, and non-reentrant checkpointing
refuses a recompute that saves other tensors. So a model with checkpointing on (transformers' own, or a torch
``CheckpointWrapper``) keeps torch's order for every forward, and its batch-1 forwards stay on FlashAttention-2.

Scope: only the training forwards (gradients recorded) of components the plugin loaded and left on SDPA (no
flash-attn, an encoder tower, or the SDPA fallback of an FA2 component); models the plugin did not load, and
components on a backend the caller chose, are never touched. The order is torch's process-wide setting, changed
for the duration of the forward and put back after it (the backward runs the kernels its forward chose); another
thread running SDPA during that forward would see the same order. How: cuDNN's kernel is disabled for the forward
and enabled again after it (``torch.backends.cuda.enable_cudnn_sdp``), which is what ``TORCH_CUDNN_SDPA_DEPRIORITIZED=1``
amounts to (torch then orders cuDNN after its math kernel, which always runs). Reordering torch's priority list
instead would not hold: torch writes its cuDNN-first order into that list at the first SDPA call of the process. A
cuDNN kernel the user disabled stays disabled. Off with ``PANOVLM_FLASHPATCH_SDPA_FLASH_FIRST=0``.
"""

from __future__ import annotations

import contextlib

import torch

from .. import state
from .varlen import KEY as VARLEN  # SDPA outside packed forwards

SDPA = "sdpa"
#: Where the last forward's shape is kept: beside the plugin's state, not in it (TorchDynamo guards on what the
#: forward wrapper reads of that state; a value changing every step there would recompile every step).
SHAPE_ATTR = "_panovlm_flashpatch_last_shape"
#: The forward of a shape that keeps torch's order: the STEADY-th in a row of that shape.
STEADY = 4


def supported() -> str | None:
    """None when this torch lets the plugin turn cuDNN's SDPA kernel off for a forward, else why not."""
    if not hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        return f"torch {torch.__version__} has no cuDNN SDPA kernel to put after the flash kernel"
    return None


def status(caps, settings) -> tuple[bool, str]:
    """(armed, reason) for a load on this machine with these settings."""
    if not settings.sdpa_flash_first:
        return False, f"{settings.source('sdpa_flash_first')}: torch's own kernel order"
    why = supported()
    if why:
        return False, why
    if not caps.cuda_available or not caps.devices:
        return False, "no CUDA GPU: SDPA's flash kernel runs on CUDA only"
    capability = caps.capability
    if capability is not None and capability < (8, 0):
        return False, f"torch's flash kernel needs compute capability >= 8.0, found {capability[0]}.{capability[1]}"
    return True, ("training forwards of a new shape try the flash kernel before cuDNN (cuDNN builds a plan for "
                  "every new shape; the same shape 4 forwards in a row: torch's order)")


def _tokens(args, kwargs):
    """The call's token tensor: ``input_ids``, else ``inputs_embeds``, else the first positional argument (the
    decoders' forwards take ``input_ids`` first)."""
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None and args:
        tokens = args[0]
    return tokens


def _shape(args, kwargs):
    tokens = _tokens(args, kwargs)
    if isinstance(tokens, torch.Tensor):
        return tuple(tokens.shape[:2])
    pixels = kwargs.get("pixel_values")  # every dimension: a new resolution is a new attention shape
    return tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else None


@contextlib.contextmanager
def _flash_before_cudnn():
    cuda = torch.backends.cuda
    if not cuda.cudnn_sdp_enabled() or not (cuda.flash_sdp_enabled() or cuda.mem_efficient_sdp_enabled()):
        # The user turned cuDNN's kernel off, or chose it alone (sdpa_kernel(CUDNN_ATTENTION)): theirs, untouched.
        yield
        return
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def one_unpadded_row(args, kwargs) -> bool:
    """A forward of one row of several tokens, no positions or cache of the caller's (one sequence)."""
    if any(kwargs.get(k) is not None for k in ("position_ids", "past_key_values", "cache_position", "cu_seq_lens_q",
                                               "cache")):
        return False
    if len(args) > 2 or (len(args) == 2 and "attention_mask" in kwargs):
        return False  # positions or a cache passed positionally, or a call transformers will reject
    tokens = _tokens(args, kwargs)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or tokens.shape[0] != 1 or tokens.shape[1] < 2:
        return False
    # A 2D padding mask is fine as it is: SDPA with a padding mask is plain transformers' own forward, and reading
    # whether the mask holds padding would cost a device sync.
    mask = kwargs.get("attention_mask", args[1] if len(args) == 2 else None)
    return mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2)


def checkpointed(model) -> bool:
    """Gradient (activation) checkpointing is on somewhere in ``model``: transformers' own, or a torch
    ``CheckpointWrapper`` (FSDP's ``apply_activation_checkpointing``, accelerate, Lightning).

    Why it matters: the recompute runs during the backward, outside the forward's window, on torch's order; on Hopper
    it would pick cuDNN where the forward ran the flash kernel, and non-reentrant checkpointing refuses a recompute
    that saves other tensors than the forward did (``CheckpointError``)."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True or type(module).__name__ == "CheckpointWrapper":
            return True
    return False


def scope(module, args, kwargs):
    """The context this forward runs in: flash first, or nothing."""
    if not torch.is_grad_enabled() or module.config.__dict__.get("_attn_implementation_internal") not in (SDPA, VARLEN):
        return contextlib.nullcontext()
    shape = _shape(args, kwargs)
    previous, run = module.__dict__.get(SHAPE_ATTR) or (None, 0)
    run = run + 1 if shape is not None and shape == previous else 1
    module.__dict__[SHAPE_ATTR] = (shape, run)
    if run >= STEADY:
        return contextlib.nullcontext()  # a fixed shape: cuDNN's plan, built once, is the faster kernel
    if checkpointed(module):  # after the cheap check: it walks the modules
        return contextlib.nullcontext()  # its recompute must pick the kernel its forward picked: torch's order
    return _flash_before_cudnn()


def attach(model, load) -> dict:
    """runtime/__init__.py's protocol: arms the SDPA components of a load the plugin decided (not the caller)."""
    from . import Effect

    if load.caps is None:
        return {}
    armed, why = status(load.caps, load.settings)
    effects = {}
    from ..observe import modules_by_component
    from transformers.modeling_utils import PreTrainedModel

    owners, specs = {}, {}
    for path, module, key in modules_by_component(model, load.keys):
        if isinstance(module, PreTrainedModel):
            owners.setdefault(key, module)  # the outermost owner of each component runs the whole forward
            armed_switch = (state.of(module) or {}).get("dispatch")
            if armed_switch is not None:
                specs.setdefault(key, armed_switch["spec"])
    for choice in load.decision.choices:
        key = choice.component.key
        if choice.requested not in (None, SDPA) or (choice.requested == SDPA and not choice.upgraded
                                                     and "keeps it" in choice.reason):
            continue  # the caller's own choice: left alone
        seen = getattr(load.observed.get(key), "backend", None)
        fallback = choice.fallback if isinstance(choice.fallback, str) else choice.component.default_backend
        if SDPA not in (seen, fallback if choice.upgraded else None):
            continue
        owner = owners.get(key)
        fields = {"sdpa_flash_first": why if armed else f"off: {why}"}
        if armed and owner is not None:
            state.ensure(owner)["sdpa_order"] = True
            spec = specs.get(key)
            measured = load.caps.capability is not None and load.caps.capability[0] == 9 and not torch.version.hip
            config = getattr(owner, "config", None)
            # Only where SDPA computes what FA2 does: the class has SDPA, and no attention soft-capping (which
            # FA2 applies and transformers' SDPA path drops or refuses: Gemma 2).
            same = (getattr(type(owner), "_supports_sdpa", False)
                    and not getattr(config, "attn_logit_softcapping", None))
            if (spec is not None and spec["fallback"] == SDPA and choice.component.role == "language model" and measured
                    and same):
                spec["unpadded_row"] = True  # batch-1 training forwards: SDPA, flash first (measured faster, sm_90)
        effects[key] = Effect(fields=fields)
    return effects
