"""Per forward: a component the plugin put on FlashAttention-2 runs each forward on the fastest backend that can run it.

Why: FlashAttention-2 cannot run every forward plain transformers runs. Its kernel refuses float32 inputs
(``RuntimeError: FlashAttention only support fp16 and bf16 data type``: an fp32 checkpoint loaded with
``dtype="auto"``, as every ``pipeline()`` of transformers 5 does, or ``model.to(torch.float32)`` after the
load), it needs the model on a CUDA GPU (``model.cpu()``), and it returns no attention weights. And in
``generate()`` it is slower than SDPA (measured on an H100, benchmarks/results: transformers' FA2 path
re-derives the padding indices in every layer of every decode step). So before each forward of an armed
component the switch picks FlashAttention-2, or the backend the component would have had without the
plugin (the caller's "sdpa", else transformers' default) for:

* ``generate()`` (unless ``PANOVLM_FLASHPATCH_GENERATE_FA2`` / ``apply(generate_fa2=True)``);
* weights off the GPU;
* float32 weights outside ``torch.autocast`` (under autocast transformers hands FA2 half-precision inputs);
* ``output_attentions=True``.

How: the component's config holds the backend its attention modules and its mask builder read at every
forward (transformers' own ``set_attn_implementation`` writes the same field). Families with one attention
class per backend (transformers 4.46-4.47) also get their attention modules' classes swapped to the
sibling class. The switch is sticky: it stays until a forward needs the other backend, so gradient
checkpointing, which re-runs layers during backward, re-runs them on the backend of their forward; and
``generate()``'s own mask preparation, which runs outside the forward, always sees the backend of the
previous forward. A mask that is already built (a dict, or a 4D tensor: generate's static cache, a custom
mask) keeps the backend it was built for. A backend someone chose (``set_attn_implementation``, by the user or
by transformers' continuous batching) is theirs: the switch stands aside for that model from then on.
When ``generate()`` returns, its components go back to what the plugin loaded.

Under ``torch.compile`` nothing switches (runtime/forward.py passes every call through).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys

import torch

import threading

from .. import _safety, reporting, state
from .._wrapping import Slot
from ..compat import autocast_half_dtype

FA2 = "flash_attention_2"
HALF = (torch.float16, torch.bfloat16)
#: Device types whose tensors flash-attn's kernels take (tests add "cpu" for their CPU stand-in kernel).
FA2_DEVICES = ("cuda",)

#: Situations in which an armed component runs its fallback backend instead of FlashAttention-2.
GENERATE = "generate()"
OFF_GPU = "off the GPU"
FP32 = "float32 outside autocast"
WEIGHTS = "output_attentions"
UNPADDED_ROW = "batch-1 training"
SITUATIONS = (GENERATE, OFF_GPU, FP32, WEIGHTS, UNPADDED_ROW)
WHY = {
    GENERATE: "faster for decoding",
    OFF_GPU: "FlashAttention-2 runs on CUDA GPUs only",
    FP32: "FlashAttention-2 runs float16/bfloat16 only",
    WEIGHTS: "FlashAttention-2 returns no attention weights",
    UNPADDED_ROW: "SDPA with its flash kernel first measured faster for one unpadded row (runtime/sdpa_order.py)",
}


def spec(key: str, fallback: str, kind: str, injected: str | None = None) -> dict:
    """The switch of one component, shared by every module that owns its config (plain data, see state.py).

    ``user``: someone chose a backend for it since (the switch stands aside); ``injected``: the dtype the plugin
    injected at load, if any (training on it gets one warning)."""
    return {"key": key, "loaded": FA2, "fallback": fallback, "current": FA2, "kind": kind, "user": False,
            "injected": injected}


def _ours(shared: dict, now) -> bool:
    """The component is on a backend the switch put there (a copy's config may carry the fallback, see state.py)."""
    return not shared.get("user") and now in (shared["loaded"], shared["fallback"])


def before(module, armed: dict, args, kwargs) -> None:
    """Puts ``module``'s component on the backend this forward should run."""
    shared = armed["spec"]
    config = module.config
    now = config.__dict__.get("_attn_implementation_internal")
    if not _ours(shared, now):
        return  # someone else chose a backend: theirs
    if shared.get("injected") and module.training and torch.is_grad_enabled() and not shared.get("warned"):
        shared["warned"] = True  # once per component of a model (its owners share the spec)
        _warn_training(module, shared["injected"])
    mask = _argument(module, "attention_mask", args, kwargs)
    if isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() > 2):
        return  # built for the backend in place
    target = shared["fallback"] if situation(module, armed, kwargs, args) else shared["loaded"]
    if target != now:
        _switch(module, armed, shared, target)
    if target == FA2 and not shared.get("pad_labels_checked") and torch.is_grad_enabled():
        _check_pad_labels(module, shared, mask, _argument(module, "labels", args, kwargs))


def before_trace(module, armed: dict) -> None:
    """While TorchDynamo traces (``torch.compile``): the component traces its fallback, what plain transformers
    would have compiled.

    A compiled graph keeps the backend it was traced with, and transformers' FlashAttention-2 path does not
    trace as plain transformers' SDPA does: its mask helper branches on the mask's values
    (``attention_mask.all()``), which ``fullgraph=True`` refuses, and its kernel refuses float32. The config
    write is a side effect Dynamo replays; nothing else is read here.
    """
    shared = armed["spec"]
    if shared["kind"] != "config":
        return  # swapping layer classes inside a trace is not something to ask of Dynamo
    values = module.config.__dict__  # a plain dict write: Dynamo replays it; the config's own __setattr__ it may not
    now = values.get("_attn_implementation_internal")
    if _ours(shared, now) and now != shared["fallback"]:
        values["_attn_implementation_internal"] = shared["fallback"]
        shared["current"] = shared["fallback"]


def _armed_modules(model):
    for module in model.modules():
        st = state.of(module)
        armed = st.get("dispatch") if state.live(st) else None
        if armed is not None:
            yield module, armed


# Inside generate() of an armed model, in this thread (nested calls, an assistant model's, count too).
_local = threading.local()


def generating() -> bool:
    return getattr(_local, "depth", 0) > 0


def enter_generate(model) -> None:
    """At ``generate()`` entry: every armed component of ``model`` onto its fallback, before transformers prepares
    anything outside the forwards (with a static cache it builds the masks there, for the backend in place)."""
    _local.depth = getattr(_local, "depth", 0) + 1
    for module, armed in _armed_modules(model):
        shared = armed["spec"]
        now = module.config.__dict__.get("_attn_implementation_internal")
        if _ours(shared, now) and now != shared["fallback"]:
            _switch(module, armed, shared, shared["fallback"])


def leave_generate(model) -> None:
    """When ``generate()`` returns (or raises): back to what the plugin loaded (no backward re-runs these forwards)."""
    _local.depth = max(getattr(_local, "depth", 0) - 1, 0)
    for module, armed in _armed_modules(model):
        shared = armed["spec"]
        now = module.config.__dict__.get("_attn_implementation_internal")
        if _ours(shared, now) and now != shared["loaded"]:
            _switch(module, armed, shared, shared["loaded"])


def _check_pad_labels(module, shared: dict, mask, labels) -> None:
    """Once per component, on its first FlashAttention-2 forward with labels and a padding mask: does the loss count
    padding positions? FA2 computes nothing there, SDPA does, so such a loss differs between them (one host sync)."""
    if not (isinstance(mask, torch.Tensor) and isinstance(labels, torch.Tensor) and mask.dim() == 2
            and labels.shape == mask.shape):
        return
    shared["pad_labels_checked"] = True
    if bool(((mask == 0) & (labels != -100)).any()):
        reporting.emit(logging.WARNING,
                       f"{type(module).__name__}'s loss counts predictions at padding positions (labels there are not "
                       "-100). FlashAttention-2 computes nothing at padding positions, SDPA does, so those terms, and "
                       "the loss, differ from plain transformers'. Set the labels at padding to -100 (as "
                       "DataCollatorForLanguageModeling does); to keep SDPA, pass attn_implementation=\"sdpa\" with "
                       "PANOVLM_FLASHPATCH_KEEP_SDPA=1.")


def _warn_training(module, injected: str) -> None:
    reporting.emit(logging.WARNING,
                       f"{type(module).__name__} trains on {injected} weights that panovlm_flashpatch injected (no dtype was "
                       f"given): with no float32 master copy, optimizer updates smaller than {injected}'s precision are "
                       "lost (AdamW at lr 2e-6 changed 3.9% of a test model's weights in 10 steps; float32: all). For "
                       "training, load with dtype=torch.float32 and train under torch.autocast (FlashAttention-2 runs "
                       "there), or pass dtype=torch.bfloat16 to make the choice yours.")


# --- someone else chooses a backend -------------------------------------------------------------------------

_MARKER = "_self_panovlm_flashpatch_user_backend"
def _user_chooses(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    if instance is not None and not isinstance(instance, type):
        try:
            for _, armed in _armed_modules(instance):
                armed["spec"]["user"] = True
            for module in instance.modules():  # the SDPA kernel order is part of the backend they chose
                st = state.of(module)
                if st and st.get("sdpa_order"):
                    st["sdpa_order"] = False
        except Exception as exc:
            _safety.absorb("set_attn_implementation", exc, "the per-forward switch may override that choice")
    return result


_SLOT = Slot("transformers.modeling_utils", "PreTrainedModel", "set_attn_implementation", _user_chooses, _MARKER)
#: Wraps ``set_attn_implementation`` (transformers >= 4.54): a backend chosen through it is the caller's.
install, uninstall = _SLOT.install, _SLOT.uninstall


def situation(module, armed: dict, kwargs, args=()) -> str | None:
    """Why this forward cannot (or should not) run FlashAttention-2, or None when it runs it."""
    if generating():
        return GENERATE
    weight = _probe_weight(module, armed.get("probe"))
    if weight is not None:
        device = weight.device.type
        if device not in FA2_DEVICES:
            return OFF_GPU
        if weight.is_floating_point() and weight.dtype not in HALF and autocast_half_dtype(device) is None:
            return FP32
    if kwargs.get("output_attentions"):
        return WEIGHTS
    if armed["spec"].get("unpadded_row") and torch.is_grad_enabled():
        from . import sdpa_order

        if sdpa_order.one_unpadded_row(args, kwargs) and not sdpa_order.checkpointed(module):
            return UNPADDED_ROW
    return None


def _switch(module, armed: dict, shared: dict, target: str) -> None:
    if shared["kind"] == "classes":
        for path in armed.get("attention", ()):
            layer = module.get_submodule(path) if path else module
            layer.__class__ = sibling(type(layer), target)
    module.config._attn_implementation_internal = target
    shared["current"] = target


def _probe_weight(module, path):
    """The weight whose dtype and device the attention's query will have (the first projection)."""
    if path:
        try:
            weight = module.get_submodule(path).weight
            if isinstance(weight, torch.Tensor):
                return weight
        except (AttributeError, TypeError):
            pass  # the module tree changed since the load (an adapter wrapped it): use the first parameter
    return next(module.parameters(), None)



def _argument(module, name: str, args, kwargs):
    if name in kwargs:
        return kwargs[name]
    index = _position(type(module), name)
    return args[index] if index is not None and index < len(args) else None


@functools.lru_cache(maxsize=None)
def _position(cls, name: str) -> int | None:
    try:
        params = list(inspect.signature(cls.forward).parameters)[1:]  # without self
    except (TypeError, ValueError):
        return None
    return params.index(name) if name in params else None


# --- families with one attention class per backend (transformers 4.46-4.47 and some later) -------------

_SUFFIXES = {FA2: "FlashAttention2", "sdpa": "SdpaAttention", "eager": "Attention"}


@functools.lru_cache(maxsize=None)
def sibling(cls, backend: str):
    """``Qwen2FlashAttention2`` -> ``Qwen2SdpaAttention`` (the same layer's class for ``backend``)."""
    name = cls.__name__
    stem = next((name[: -len(s)] for s in ("FlashAttention2", "SdpaAttention", "Attention") if name.endswith(s)), None)
    module = sys.modules.get(cls.__module__)
    found = getattr(module, f"{stem}{_SUFFIXES[backend]}", None) if stem is not None else None
    if not isinstance(found, type):
        raise LookupError(f"{name} has no {backend} counterpart in {cls.__module__}")
    return found


def describe(shared: dict, generate_fa2: bool) -> dict[str, str]:
    """Situation -> backend, for the report."""
    return {s: shared["fallback"] for s in SITUATIONS
            if not (s == GENERATE and generate_fa2) and not (s == UNPADDED_ROW and not shared.get("unpadded_row"))}


# --- arming, once per load ------------------------------------------------------------------------------


def default_backend(model_class) -> str:
    """What transformers picks when no ``attn_implementation`` is given: SDPA where the class has it, else eager."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def note(shared: dict, generate_fa2: bool) -> str:
    cannot = ", ".join(s for s in SITUATIONS if s not in (GENERATE, UNPADDED_ROW))
    where = f"where FlashAttention-2 cannot run ({cannot})"
    return f"{shared['fallback']} {where}" if generate_fa2 else f"{shared['fallback']} in generate() (faster) and {where}"


def attach(model, load) -> dict:
    """Arms every component the plugin put on FlashAttention-2 (runtime/__init__.py's protocol)."""
    from transformers.modeling_utils import PreTrainedModel

    from ..observe import class_backend, is_attention_module, modules_by_component
    from . import Effect

    upgraded = {c.component.key: c for c in load.decision.choices
                if c.upgraded and getattr(load.observed.get(c.component.key), "backend", None) == FA2}
    if not upgraded:
        return {}
    entries = list(modules_by_component(model, load.keys))
    effects = {}
    for key, choice in upgraded.items():
        owners = [(p, m) for p, m, k in entries if k == key and isinstance(m, PreTrainedModel)]
        layers = [(p, m) for p, m, k in entries if k == key and is_attention_module(m)]
        legacy = any(class_backend(m) for _, m in layers)
        if legacy:  # one class per backend: the layers to swap are the FlashAttention-2 ones
            layers = [(p, m) for p, m in layers if class_backend(m) == FA2]
        if not owners or not layers:
            raise LookupError(f"no attention layers found for component {key or 'model'!r}")
        fallback = choice.requested if isinstance(choice.requested, str) else default_backend(type(owners[0][1]))
        if legacy:
            sibling(type(layers[0][1]), fallback)  # LookupError when the family has no such class
        shared = spec(key, fallback, "classes" if legacy else "config", load.decision.inject_dtype)
        for owner_path, owner in owners:
            prefix = f"{owner_path}." if owner_path else ""
            mine = [p[len(prefix):] for p, _ in layers if p.startswith(prefix)]
            if not mine:
                continue
            first = owner.get_submodule(mine[0])
            probe = next((f"{mine[0]}.{n}" for n, m in first.named_modules() if n and isinstance(m, torch.nn.Linear)), None)
            # One shared spec per component: every owner (Qwen3ForCausalLM and its Qwen3Model) sees one "current".
            state.ensure(owner)["dispatch"] = {"spec": shared, "attention": mine if legacy else [], "probe": probe}
        effects[key] = Effect(note=note(shared, load.settings.generate_fa2),
                              fields={"phases": describe(shared, load.settings.generate_fa2)})
    state.ensure(model)["switches"] = True
    return effects
