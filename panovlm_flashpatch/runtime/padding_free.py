"""Padding-free training: a padded training forward of a causal LM runs packed, then is unpacked.

Why: on a padded batch every layer computes the padding too. Users get packing today only by
rewriting their collator (TRL's ``padding_free``, ``DataCollatorWithFlattening``); this module gives it
to unmodified training code, on by default for the forwards that run a flash kernel (FlashAttention-2, or torch's
varlen kernel where flash-attn is missing: varlen.py); ``padding_free=False`` turns it off. Measured on an H100 against plain
transformers (SDPA, padded), benchmarks/results/padding_free: 1.35x real-token throughput and 0.57 of
the peak memory for a 0.6B LM at batch 8 (where the packed step is bound by kernel launches on the
CPU), 1.88x and 0.55 at batch 16.

What one packed forward does (``_forward_wrapper``):

1. Host-side gates, no device work: the model is armed (loaded through the plugin with the switch
   on, a verified architecture), the forward is a training forward (see below), the backend this
   forward runs on (after dispatch.py) separates packed sequences by ``position_ids`` in this
   transformers, and the call has nothing we cannot reproduce (a cache, a 4D mask, an unknown argument).
2. One device-to-host read of a few flags (``_inspect``): is there padding, is every row one
   contiguous run of tokens, do the labels allow packing (see below), the number of real tokens.
3. The real tokens (``input_ids`` or ``inputs_embeds``) are gathered into one row with restarting
   ``position_ids``; labels are gathered too and ignored at each sequence start, so no token
   predicts across a boundary. The model runs once on that row with ``use_cache=False``.
4. Logits, hidden states and attentions are scattered back to the caller's padded shapes; padding
   positions hold zeros. ``past_key_values`` is None (a training forward has no use for it).

A training forward is one of a model in training mode, or one that records gradients and has labels:
Lightning keeps every submodule in the mode it had when training started, and ``from_pretrained`` returns
models in eval mode, so a language model nobody called ``.train()`` on still trains in eval mode. A forward
in eval mode that records gradients without labels stays padded (the caller's own loss may read any
position), and says so once.

When packing would change the result, the forward takes the normal path instead (logged once per
reason): a left-padded row whose first real label is not ignored (the padded run predicts it from a
pad position, a packed run cannot), a left-padded batch without labels (the caller's own loss may
count that prediction), labels that are not ignored at padding positions, padding inside a row.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys

import torch

from .. import _safety, reporting, state
from . import chunked_loss, varlen

FA2 = "flash_attention_2"
SDPA = "sdpa"
IGNORE_INDEX = -100

#: Model types whose packed forward is verified equal to the padded one (tests/test_padding_free.py on
#: the CPU; tests/gpu on FlashAttention-2). A model whose attention does not receive ``position_ids``
#: would let packed sequences attend to each other, silently (GPT-2 is one), so this is a list, not a
#: guess from the class.
VERIFIED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"})
#: Not packable, and why (the report says it). Qwen2-VL's text model widens 1-row position_ids to its 3 rotary rows
#: and hands the mask builder positions only when it gets 4 rows, so a packed row's sequences attend to each other
#: (measured: logits off by 0.5-0.8); its image-text classes are not causal LMs either.
REFUSED = {
    "qwen2_vl": "Qwen2-VL's multimodal RoPE takes 3-row position_ids built from the image grid, and its text model does "
                "not keep packed sequences apart from 1-row positions (packed logits differ by ~0.6)",
    "qwen2_5_vl": "Qwen2.5-VL's multimodal RoPE takes 3-row position_ids built from the image grid, and its text model "
                  "does not keep packed sequences apart from 1-row positions (packed logits differ by ~0.5)",
}
#: Composite (image-text) model types packed at their top level, by the sub-config of their language model: the
#: packed row keeps the image tokens in order, so the image features land where the padded run puts them (checked:
#: loss within 1e-7, every gradient, the vision tower's included, within 1e-6 of its scale). Packed only from
#: transformers 4.53: the inner language model may fall back to SDPA per forward, which keeps packed sequences
#: apart only from there.
COMPOSITES = {"llava": "text_config"}
#: The composites' own arguments, handed through to the packed call as they are.
_COMPOSITE_ARGS = frozenset({"pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
                             "mm_encoder_outputs"})
#: RoPE variants that choose their frequencies per forward from the largest position: a padded row counts positions
#: up to the batch's width, a packed one up to the longest sequence, so the two can differ (Phi-3 128k's longrope:
#: logits 6.5e-3, gradients 2e-2; dynamic NTK 2.5e-4).
_POSITION_DEPENDENT_ROPE = ("longrope", "dynamic")

#: Arguments a packed forward reproduces; any other argument with a non-default value takes the
#: normal path. ``num_items_in_batch`` (Trainer's loss normaliser) passes through unchanged.
_HANDLED = frozenset({
    "input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "labels", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "cache_position", "logits_to_keep",
    "num_logits_to_keep", "num_items_in_batch", "cache",
})


@dataclasses.dataclass(frozen=True)
class Status:
    """Whether a loaded model packs its padded training forwards, and why (for the report)."""

    armed: bool
    reason: str
    #: Armed and the backend it loaded with keeps packed sequences apart (packing happens now).
    active: bool = False
    #: A packed training output that has a loss carries no logits (``padding_free="loss_only"``).
    loss_only: bool = False
    #: The default (``padding_free`` unset): only forwards that run FlashAttention-2, or SDPA forwards that can run
    #: torch's varlen kernel (varlen.py), are packed.
    auto: bool = False
    #: Why packed SDPA forwards cannot run torch's varlen kernel here (None: they can, and do).
    varlen: str | None = "not checked"
    #: loss_only: why a packed loss cannot be computed in chunks from the hidden states (None: it is, chunked_loss.py).
    chunked: str | None = "not checked"
    #: The model's forward soft-caps its logits with ``config.final_logit_softcapping`` (Gemma 2/3): the chunks do too.
    softcap: bool = False

    def describe(self) -> str:
        mode = "on" if self.active else ("armed, inactive" if self.armed else "off")
        if self.auto and self.armed:
            mode += " (default: FlashAttention-2 forwards, and SDPA ones on torch's varlen kernel)"
        extra = ""
        if self.armed and self.loss_only:
            how = ("the loss computed from the last hidden states a chunk at a time (the full logits never exist)"
                   if self.chunked is None else f"the loss computed by the model (not chunked: {self.chunked})")
            extra = f"; outputs with a loss carry no logits (loss_only), {how}"
        return f"padding-free {mode}: {self.reason}{extra}"

    def to_state(self) -> dict:
        return {"armed": self.armed, "active": self.active, "loss_only": self.loss_only, "reason": self.reason,
                "auto": self.auto, "varlen": self.varlen, "chunked": self.chunked, "softcap": self.softcap}


def sdpa_separates_packed() -> bool:
    """transformers >= 4.53 builds SDPA/eager masks that keep packed sequences apart (by position_ids)."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


def _module_builds_packed_masks(model) -> bool:
    """The decoder's code builds its mask with ``create_causal_mask`` (where the packing detection lives).

    The decoder (``base_model``, e.g. Qwen3Model) rather than the loaded class: a user's subclass of
    Qwen3ForCausalLM lives in the user's module, its decoder in transformers'."""
    try:
        decoder = model.get_decoder()  # the language model inside a composite too
    except Exception:
        decoder = None
    decoder = decoder if decoder is not None else getattr(model, "base_model", model)
    module = sys.modules.get(type(decoder).__module__)
    return module is not None and hasattr(module, "create_causal_mask")


def backend_reason(model, backend) -> str | None:
    """None when ``backend`` keeps packed sequences apart for this model, else why not."""
    if backend == FA2:
        return None
    if backend in ("sdpa", "eager"):
        import transformers

        if not sdpa_separates_packed():
            return (f"transformers {transformers.__version__} keeps packed sequences apart on {backend} only from 4.53 "
                    "(FlashAttention-2 does on every supported version)")
        if not _module_builds_packed_masks(model):
            return f"{type(model).__name__} does not build its {backend} mask with create_causal_mask"
        return None
    return f"{backend!r} is not verified to keep packed sequences apart (flash_attention_2, sdpa, eager are)"


def lm_config(model):
    """The config whose backend the packed forward runs on: the model's, or its language model's in a composite."""
    config = model.config
    key = COMPOSITES.get(getattr(config, "model_type", None))
    return getattr(config, key, config) if key else config


def status_for(model) -> Status:
    """Can this loaded model be armed at all (its architecture and forward, not the backend of the moment)."""
    cls = type(model)
    composite = getattr(getattr(model, "config", None), "model_type", None) in COMPOSITES
    if composite:
        if not sdpa_separates_packed():
            import transformers

            return Status(False, f"{cls.__name__} is packed from transformers 4.53 (found {transformers.__version__}): its "
                                 "language model may fall back to SDPA per forward, which keeps packed sequences apart "
                                 "only from there")
        if not _is_model_of(cls, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"):
            return Status(False, f"{cls.__name__} is not an image-text-to-text model of transformers")
    config = lm_config(model) if composite else getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        return Status(False, f"model type {model_type!r} stays padded: {REFUSED[model_type]}")
    rope = _rope_type(config)
    if rope in _POSITION_DEPENDENT_ROPE:
        return Status(False, f"its {rope!r} RoPE picks its frequencies from the longest position of a forward, which "
                             "packing changes (padded and packed logits differ): stays padded")
    if model_type not in VERIFIED_MODEL_TYPES:
        return Status(False, f"model type {model_type!r} is not verified for packing "
                              f"(verified: {', '.join(sorted(VERIFIED_MODEL_TYPES))})")
    if not composite and not _is_causal_lm(cls):
        return Status(False, f"{cls.__name__} is not a causal language model (padding-free packs causal-LM forwards)")
    params = _parameters(_defining_forward(cls)[1])
    missing = [p for p in ("attention_mask", "position_ids", "labels", "inputs_embeds") if p not in params]
    if missing:
        return Status(False, f"{cls.__name__}.forward takes no {', '.join(missing)}")
    backend = getattr(config, "_attn_implementation", None)
    why_not = backend_reason(model, backend)
    if why_not:
        return Status(True, f"on {backend} padded training forwards stay padded: {why_not}")
    return Status(True, f"padded training forwards run packed into one row ({backend} keeps the sequences apart)",
                  active=True)


def _rope_type(config) -> str | None:
    """The RoPE variant (``rope_scaling`` on 4.x, ``rope_parameters`` on 5.x), None for the default."""
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        if not isinstance(value, dict):
            continue
        # 5.x keeps one entry per layer type for models with several ({"full_attention": {...}, ...}).
        entries = [v for v in value.values() if isinstance(v, dict)] if all(
            isinstance(v, dict) for v in value.values()) and value else [value]
        kinds = [e.get("rope_type", e.get("type")) for e in entries]
        for kind in kinds:
            if kind in _POSITION_DEPENDENT_ROPE:
                return kind
        for kind in kinds:
            if kind and kind != "default":
                return kind
    return None


def _is_causal_lm(cls) -> bool:
    """The class, or a transformers class it subclasses (a user's own subclass counts), is a causal LM."""
    return _is_model_of(cls, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")


def _is_model_of(cls, mapping: str) -> bool:
    """The class, or a transformers class it subclasses, is in one of transformers' task mappings."""
    from transformers.models.auto import modeling_auto

    names = set()
    for entry in getattr(modeling_auto, mapping, {}).values():
        names.update((entry,) if isinstance(entry, str) else entry)
    return any(k.__name__ in names and k.__module__.startswith("transformers.") for k in cls.__mro__)


def arm(model, loss_only: bool = False, auto: bool = False, varlen_reason: str | None = "not checked") -> Status:
    """Arms ``model`` for packing: its state says so (runtime/__init__.py then wraps its class's forward).

    ``varlen_reason``: why packed SDPA forwards cannot run torch's varlen kernel on this machine (None: they can)."""
    status = dataclasses.replace(status_for(model), loss_only=loss_only, auto=auto)
    if loss_only and status.armed:
        status = dataclasses.replace(status, **_chunking(model))
    backend = getattr(lm_config(model), "_attn_implementation", None)
    if varlen_reason is None and backend != SDPA:
        varlen_reason = f"the language model runs {backend}, not SDPA"
    status = dataclasses.replace(status, varlen=varlen_reason)
    if status.active and backend == SDPA and varlen_reason is None:
        status = dataclasses.replace(status, reason="padded training forwards run packed into one row, their attention on "
                                                    "torch's varlen flash kernel (varlen.py: flash-attn is not needed)")
    elif auto and status.armed and backend != FA2:
        status = dataclasses.replace(status, active=False,
                                     reason="by default packs FlashAttention-2 forwards, and SDPA ones where torch's "
                                            f"varlen kernel can run them, which it cannot here: {varlen_reason} "
                                            "(padding_free=True packs on SDPA/eager with a block mask)")
    if status.armed:
        state.ensure(model)["padding_free"] = status.to_state()
    return status


def _chunking(model) -> dict:
    """``chunked`` and ``softcap`` of a loss_only model's Status."""
    try:
        forward, config = _defining_forward(type(model))[1], lm_config(model)
        return {"chunked": chunked_loss.model_reason(model, forward, config),
                "softcap": chunked_loss.reads_softcap(forward)}
    except Exception as exc:  # a bug of ours costs the chunking, not the packing
        _safety.absorb("checking the chunked loss", exc, "loss_only computes the loss the model's way")
        return {"chunked": f"it could not be checked ({type(exc).__name__})"}


def is_armed(model) -> bool:
    """Armed since the last ``remove()``."""
    st = state.of(model)
    return state.live(st) and bool(st.get("padding_free", {}).get("armed"))


def _defining_forward(cls) -> tuple[type, object]:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return klass, vars(klass)["forward"]
    raise TypeError(f"{cls.__name__} has no forward")


@functools.lru_cache(maxsize=None)
def _parameters(function) -> tuple[str, ...]:
    function = getattr(function, "__wrapped__", function)
    return tuple(inspect.signature(function).parameters)


@functools.lru_cache(maxsize=None)
def _call_signature(function) -> tuple[inspect.Signature, str | None]:
    """The forward's signature without ``self``, and the name of its ``**kwargs`` (None if it has none).

    Cached on the function, never on a bound method (that would keep every model alive)."""
    signature = inspect.signature(function)
    params = list(signature.parameters.values())[1:]
    var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    return signature.replace(parameters=params), var_kw


def _bind(wrapped, args, kwargs) -> dict:
    """The call's arguments by name, ``**kwargs`` flattened in (raises TypeError like the call would)."""
    signature, var_kw = _call_signature(getattr(wrapped, "__func__", wrapped))
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    if var_kw:
        arguments.update(arguments.pop(var_kw, {}))
    return arguments


def _skip(model, key: str, message: str) -> None:
    reporting.log_once(f"padding-free:{type(model).__name__}:{key}", reporting.info_level(),
                       f"padding-free: {type(model).__name__} takes the normal (padded) path: {message}")


def forward(wrapped, instance, args, kwargs, packing: dict):
    """One forward of an armed model (called by runtime/forward.py): packed when it can be, else as called."""
    def unpacked():
        return wrapped(*args, **kwargs)
    if not instance.training and not torch.is_grad_enabled():
        return unpacked()  # evaluation or inference: never packed
    on_varlen = _runs_varlen(instance, packing)
    if packing.get("auto") and not on_varlen and not _runs_fa2(instance):
        return unpacked()  # by default only forwards on a flash kernel are packed (measured faster there)
    try:
        call = _bind(wrapped, args, kwargs)
    except TypeError:
        return unpacked()  # let transformers raise its own error
    try:
        packed = _prepare(instance, call, on_varlen) if _training_forward(instance, call) else None
    except Exception as exc:  # a bug of ours must never cost the caller a training step
        _safety.absorb("padding-free", exc, f"a forward of {type(instance).__name__} ran padded")
        return unpacked()
    if packed is None:
        return unpacked()
    layout, packed_call = packed

    config = lm_config(instance)

    def run(arguments):
        if not on_varlen:
            return wrapped(**arguments)
        varlen.engage(config)  # for good: a layer on the key computes what its arguments ask (varlen.py)
        with varlen.packing(config):
            return wrapped(**arguments)

    if packing.get("loss_only") and packing.get("chunked", "not checked") is None and packed_call.get("labels") is not None:
        output = chunked_loss.forward(instance, run, packed_call, config, bool(packing.get("softcap")))
    else:
        output = run(packed_call)
    drop_logits = packing.get("loss_only") and getattr(output, "loss", None) is not None
    result = _unpack_output(output, layout, _wants_dict(instance, call), drop_logits)
    if on_varlen:  # its backward must find the key (readers.py waits for it)
        varlen.until_backward(config, _first_tensor(result))
    return result


def _first_tensor(output):
    """What the caller runs the backward from: the loss, else the logits (a tuple: its first entry)."""
    if isinstance(output, tuple):
        return output[0] if output else None
    loss = getattr(output, "loss", None)
    return loss if loss is not None else getattr(output, "logits", None)


def _runs_varlen(model, packing: dict) -> bool:
    """This forward's language model is on SDPA and its packed attention can run torch's varlen kernel."""
    if packing.get("varlen", "not checked") is not None:
        return False
    if lm_config(model).__dict__.get("_attn_implementation_internal") not in (SDPA, varlen.KEY):
        return False
    return varlen.forward_reason(model) is None


def _runs_fa2(model) -> bool:
    """This forward's language model will run FlashAttention-2. A causal LM's own switch has run already
    (runtime/forward.py); a composite's language model switches inside, so its situation is asked here."""
    config = lm_config(model)
    if config is model.config:
        return config.__dict__.get("_attn_implementation_internal") == FA2
    from . import dispatch

    for module, armed in dispatch._armed_modules(model):
        if module.config is config:
            spec = armed["spec"]
            return spec["loaded"] == FA2 and not spec.get("user") and dispatch.situation(module, armed, {}) is None
    return False


def _training_forward(model, call) -> bool:
    """Training mode, or (in eval mode, gradients recorded) labels given; else says once why not packed."""
    if model.training:
        return True
    if call.get("labels") is not None:
        reporting.log_once(f"padding-free:{type(model).__name__}:eval-mode", reporting.info_level(),
                           f"padding-free: {type(model).__name__} is in eval mode but records gradients and has labels "
                           "(Lightning keeps each submodule's mode): its training forwards run packed")
        return True
    _skip(model, "eval-no-labels", "it is in eval mode and the forward has no labels (call .train() on it, or pass "
                                   "labels, to have its training forwards packed)")
    return False


def _wants_dict(model, call) -> bool:
    if call.get("return_dict") is not None:
        return bool(call["return_dict"])
    config = model.config
    return bool(getattr(config, "return_dict", True)) and not getattr(config, "torchscript", False)


@dataclasses.dataclass
class Layout:
    """Where the real tokens of a padded (B, L) batch sit in the packed row of T tokens."""

    batch: int
    length: int
    flat_index: object  # (T,) positions of the real tokens in the flattened (B*L) batch
    total: int


def _prepare(model, call: dict, on_varlen: bool = False):
    """Host-side gates, then one device read; returns ``(layout, packed_call)`` or None (normal path)."""
    import torch

    mask = call.get("attention_mask")
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    tokens = ids if ids is not None else embeds
    if mask is None or tokens is None or (ids is not None and embeds is not None):
        return None  # nothing to unpad (e.g. a batch the caller packed itself), or a call transformers rejects
    backend = varlen.public(lm_config(model)._attn_implementation)
    why_not = None if on_varlen else backend_reason(model, backend)
    if why_not:
        _skip(model, f"backend:{backend}", why_not)
        return None
    own = _COMPOSITE_ARGS if model.config.model_type in COMPOSITES else ()
    extra = sorted(k for k, v in call.items() if k not in _HANDLED and k not in own and v is not None)
    if extra:
        _skip(model, "args:" + ",".join(extra), f"it cannot reproduce the argument(s) {', '.join(extra)}")
        return None
    if any(call.get(k) is not None for k in ("past_key_values", "cache", "cache_position")):
        _skip(model, "cache", "the call passes a cache (past_key_values, cache or cache_position)")
        return None
    if call.get("use_cache"):
        _skip(model, "use_cache", "the call asks for use_cache=True")
        return None
    if call.get("logits_to_keep") or call.get("num_logits_to_keep"):
        _skip(model, "logits_to_keep", "the call asks for logits_to_keep")
        return None
    if getattr(lm_config(model), "is_causal", True) is False:
        _skip(model, "bidirectional", "its config says is_causal=False (bidirectional attention), and packing keeps "
                                      "sequences apart with causal masks only")
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != tuple(tokens.shape[:2]):
        _skip(model, "mask", "the attention mask is not a 2D (batch, length) padding mask (a custom 4D mask?)")
        return None
    labels, positions = call.get("labels"), call.get("position_ids")
    inspection = _inspect(mask, labels, positions)
    if not inspection["padded"]:
        return None  # no padding: packing gains nothing
    problem = _problem(inspection, labels is not None, positions is not None)
    if problem:
        _skip(model, problem[0], problem[1])
        return None
    layout, packed = _pack(call, inspection, backend, on_varlen)
    kernel = "sdpa, attention on torch's varlen kernel" if on_varlen else backend
    reporting.log_once(f"padding-free-first:{type(model).__name__}", reporting.info_level(),
                       f"padding-free: {type(model).__name__} runs padded training batches packed "
                       f"(first: {layout.batch}x{layout.length} -> 1x{layout.total}, "
                       f"{layout.total / (layout.batch * layout.length):.0%} real tokens, {kernel})")
    return layout, packed


def _inspect(mask, labels, positions) -> dict:
    """Everything the gates need from the device, in one transfer."""
    import torch

    present = mask.bool()
    batch, length = present.shape
    steps = torch.arange(length, device=present.device)
    count = present.sum(1)
    first = present.to(torch.int8).argmax(1)  # first real token (0 for an empty row)
    contiguous = (present == ((steps >= first[:, None]) & (steps < (first + count)[:, None]))).all()
    left = (first > 0) & (count > 0)
    flags = {
        "padded": (count < length).any(),
        "contiguous": contiguous,
        "left": left.any(),
        "empty_rows": (count == 0).any(),
        "total": count.sum(),
        "longest": count.max(),
    }
    if labels is not None:
        ignored = labels == IGNORE_INDEX
        flags["pad_labels_ignored"] = (ignored | present).all()
        first_label_ignored = ignored.gather(1, first[:, None]).squeeze(1)
        flags["left_first_label_ignored"] = (first_label_ignored | ~left).all()
    if positions is not None:
        expected = steps[None, :] - first[:, None]
        flags["positions_restart"] = ((positions.expand(batch, length) - expected).masked_fill(~present, 0) == 0).all()
    names = list(flags)
    values = torch.stack([torch.as_tensor(flags[n], device=present.device).long() for n in names]).tolist()
    result = dict(zip(names, values))
    result.update(first=first, count=count, present=present)
    return result


def _problem(info: dict, has_labels: bool, has_positions: bool) -> tuple[str, str] | None:
    if not info["total"]:
        return "empty", "every row is padding (no real token to pack)"
    if not info["contiguous"]:
        return "holes", "a row's attention mask has padding between real tokens"
    if has_positions and not info["positions_restart"]:
        return "positions", "the given position_ids do not count 0, 1, 2, ... from each sequence's first real token"
    if has_labels and not info["pad_labels_ignored"]:
        return "pad-labels", ("labels at padding positions are not -100: the padded loss counts them, a packed one "
                              "cannot (set them to -100)")
    if info["left"] and has_labels and not info["left_first_label_ignored"]:
        return "left-labels", ("left padding with the first real token's label not -100: the padded run predicts it "
                               "from a pad position, which a packed run cannot reproduce (pad on the right, or set "
                               "that label to -100)")
    if info["left"] and not has_labels:
        return "left-no-labels", ("left padding without labels: a loss computed from the logits may count the "
                                  "prediction made at a pad position (pad on the right, or pass labels)")
    return None


def _pack(call: dict, info: dict, backend: str, on_varlen: bool = False):
    import torch
    import torch.nn.functional as F

    present, first, count = info["present"], info["first"], info["count"]
    batch, length = present.shape
    total = info["total"]
    # Indices of the real tokens, in order, without a host sync: a stable sort puts them first.
    flat_index = torch.argsort((~present).flatten().to(torch.int8), stable=True)[:total]
    steps = torch.arange(length, device=present.device)
    positions = (steps[None, :] - first[:, None]).flatten().index_select(0, flat_index)
    packed = {k: v for k, v in call.items() if k not in ("attention_mask", "input_ids", "inputs_embeds", "labels",
                                                         "position_ids", "past_key_values", "cache", "cache_position",
                                                         "logits_to_keep", "num_logits_to_keep")}
    packed.update(attention_mask=None, position_ids=positions[None, :], use_cache=False, return_dict=True)
    if call.get("input_ids") is not None:
        packed["input_ids"] = call["input_ids"].flatten().index_select(0, flat_index)[None, :]
    else:
        embeds = call["inputs_embeds"]
        packed["inputs_embeds"] = embeds.reshape(batch * length, embeds.shape[-1]).index_select(0, flat_index)[None]
    if call.get("labels") is not None:
        labels = call["labels"].flatten().index_select(0, flat_index)
        packed["labels"] = labels.masked_fill(positions == 0, IGNORE_INDEX)[None, :]
    if on_varlen or (backend == FA2 and not info["empty_rows"] and passes_varlen_kwargs()):
        # Saves FlashAttention-2 re-deriving the boundaries from position_ids in every layer (a
        # nonzero and host syncs per layer); the position_ids stay for the rotary embeddings.
        # torch's varlen kernel (varlen.py) gets its boundaries only this way.
        if info["empty_rows"]:
            count = count[count > 0]  # an empty row is no sequence of the packed row
        lengths = F.pad(count.cumsum(0), (1, 0)).to(torch.int32)
        packed.update(cu_seq_lens_q=lengths, cu_seq_lens_k=lengths, max_length_q=info["longest"],
                      max_length_k=info["longest"])
    if on_varlen:
        packed[varlen.MARKER] = True
    return Layout(batch=batch, length=length, flat_index=flat_index, total=total), packed


@functools.lru_cache(maxsize=1)
def passes_varlen_kwargs() -> bool:
    """transformers >= 4.53 routes ``cu_seq_lens_*``/``max_length_*`` from the model call to the FA2 kernel."""
    from ..compat import parse_version
    import transformers

    return parse_version(transformers.__version__)[:2] >= (4, 53)


def _scatter(tensor, layout: Layout):
    """(1, T, ...) -> (B, L, ...), zeros at padding positions; differentiable."""
    rows = tensor[0]
    out = rows.new_zeros((layout.batch * layout.length,) + tuple(rows.shape[1:]))
    return out.index_copy(0, layout.flat_index, rows).view(layout.batch, layout.length, *rows.shape[1:])


def _scatter_attention(weights, layout: Layout):
    """(1, heads, T, T) -> (B, heads, L, L): each row's own block, zeros elsewhere."""
    import torch

    slot = torch.full((layout.batch * layout.length,), -1, dtype=torch.long, device=weights.device)
    slot[layout.flat_index] = torch.arange(layout.total, device=weights.device)
    slot = slot.view(layout.batch, layout.length)
    safe = slot.clamp(min=0)
    picked = weights[0][:, safe[:, :, None], safe[:, None, :]]  # (heads, B, L, L)
    keep = (slot[:, :, None] >= 0) & (slot[:, None, :] >= 0)
    return (picked * keep.to(picked.dtype)).permute(1, 0, 2, 3)


def _unpack_output(output, layout: Layout, wants_dict: bool, drop_logits: bool = False):
    if drop_logits:
        output["logits"] = None  # loss_only: the caller said it reads only the loss
    elif getattr(output, "logits", None) is not None:
        output["logits"] = _scatter(output.logits, layout)
    if getattr(output, "hidden_states", None) is not None:
        output["hidden_states"] = tuple(_scatter(h, layout) for h in output.hidden_states)
    if getattr(output, "attentions", None) is not None:
        output["attentions"] = tuple(_scatter_attention(a, layout) for a in output.attentions)
    return output if wants_dict else output.to_tuple()


def attach(model, load) -> dict:
    """runtime/__init__.py's protocol: arms the loaded model when the switch is on."""
    from .. import settings
    from . import Effect

    mode = load.settings.padding_free
    if not mode:
        return {}
    auto = mode == settings.AUTO_VALUE
    no_varlen = varlen_reason(model, load)
    if auto and no_varlen is not None and not any(c.upgraded for c in load.decision.choices):
        return {}  # by default only forwards on a flash kernel are packed, and none of this load's will be
    if no_varlen is None and not varlen.register():
        no_varlen = "this transformers has no attention interface to register torch's varlen kernel with"
    if no_varlen is None:
        from . import portable

        portable.install()  # a copy or pickle of a config on the varlen key carries "sdpa"
    status = arm(model, loss_only=mode == settings.LOSS_ONLY, auto=auto, varlen_reason=no_varlen)
    key = COMPOSITES.get(getattr(model.config, "model_type", None))  # a composite packs for its language model
    return {key: Effect(note=status.describe(), fields={"padding_free": status.describe()})}


def varlen_reason(model, load) -> str | None:
    """Why this load's packed SDPA forwards cannot run torch's varlen kernel (None: they can)."""
    if not passes_varlen_kwargs():
        import transformers

        return f"transformers {transformers.__version__} hands the sequence boundaries to the attention only from 4.53"
    why = varlen.machine_reason(load.caps) or varlen.model_reason(lm_config(model))
    if why:
        return why
    if not _module_builds_packed_masks(model):  # its own mask code would build one causal mask over the packed row
        return f"{type(model).__name__} does not build its mask with create_causal_mask"
    key = COMPOSITES.get(getattr(model.config, "model_type", None))
    choice = next((c for c in load.decision.choices if (c.component.key or None) == key), None)
    if choice is not None and choice.requested == SDPA and load.settings.keep_explicit_sdpa:
        return ("the caller's attn_implementation='sdpa' is kept (keep_explicit_sdpa): torch's varlen kernel is not used "
                "for it")
    return None
