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
mask) keeps the backend it was built for. A backend set by someone else (``set_attn_implementation``) is
theirs: the switch stands aside until the component is back on what the plugin loaded.

Under ``torch.compile`` nothing switches (runtime/forward.py passes every call through).
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

from . import generate

FA2 = "flash_attention_2"
HALF = (torch.float16, torch.bfloat16)
#: Device types whose tensors flash-attn's kernels take (tests add "cpu" for their CPU stand-in kernel).
FA2_DEVICES = ("cuda",)

#: Situations in which an armed component runs its fallback backend instead of FlashAttention-2.
GENERATE = "generate()"
OFF_GPU = "off the GPU"
FP32 = "float32 outside autocast"
WEIGHTS = "output_attentions"
SITUATIONS = (GENERATE, OFF_GPU, FP32, WEIGHTS)
WHY = {
    GENERATE: "faster for decoding",
    OFF_GPU: "FlashAttention-2 runs on CUDA GPUs only",
    FP32: "FlashAttention-2 runs float16/bfloat16 only",
    WEIGHTS: "FlashAttention-2 returns no attention weights",
}


def spec(key: str, fallback: str, kind: str) -> dict:
    """The switch of one component, shared by every module that owns its config (plain data, see state.py)."""
    return {"key": key, "loaded": FA2, "fallback": fallback, "current": FA2, "kind": kind}


def before(module, armed: dict, args, kwargs) -> None:
    """Puts ``module``'s component on the backend this forward should run."""
    shared = armed["spec"]
    config = module.config
    now = config.__dict__.get("_attn_implementation_internal")
    if now != shared["loaded"] and now != shared["current"]:
        return  # someone else chose a backend: theirs
    mask = _argument(module, "attention_mask", args, kwargs)
    if isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() > 2):
        return  # built for the backend in place
    target = shared["fallback"] if situation(module, armed, kwargs) else shared["loaded"]
    if target != now:
        _switch(module, armed, shared, target)


def before_trace(module, armed: dict) -> None:
    """The part of :func:`before` that TorchDynamo can trace (``torch.compile``, fullgraph too).

    A graph compiled on FlashAttention-2 keeps it, so a float32 model the plugin put on FlashAttention-2,
    compiled outside autocast, must trace its fallback: plain transformers would have compiled SDPA. Only
    what the trace fixes for good is read (the weights' dtype, autocast); the config write is a side
    effect Dynamo replays; generate() and per-call arguments are not looked at here.
    """
    shared = armed["spec"]
    if shared["kind"] != "config":
        return  # swapping layer classes inside a trace is not something to ask of Dynamo
    config = module.config
    now = config._attn_implementation
    if now != shared["loaded"] and now != shared["current"]:
        return  # someone else chose a backend: theirs
    weight = next(module.parameters())
    fp32 = weight.dtype not in HALF and not _autocast_half(weight.device.type)
    target = shared["fallback"] if fp32 else shared["loaded"]
    if target != now:
        config._attn_implementation_internal = target
        shared["current"] = target


def enter_generate(model) -> None:
    """At ``generate()`` entry: every armed component of ``model`` onto its fallback, before transformers prepares
    anything outside the forwards (with a static cache it builds the masks there, for the backend in place)."""
    from .. import state

    for module in model.modules():
        st = state.of(module)
        armed = st.get("dispatch") if state.live(st) else None
        if armed is None:
            continue
        shared = armed["spec"]
        now = module.config.__dict__.get("_attn_implementation_internal")
        if now in (shared["loaded"], shared["current"]) and now != shared["fallback"]:
            _switch(module, armed, shared, shared["fallback"])


def situation(module, armed: dict, kwargs) -> str | None:
    """Why this forward cannot (or should not) run FlashAttention-2, or None when it runs it."""
    if generate.active():
        return GENERATE
    weight = _probe_weight(module, armed.get("probe"))
    if weight is not None:
        device = weight.device.type
        if device not in FA2_DEVICES:
            return OFF_GPU
        if weight.is_floating_point() and weight.dtype not in HALF and not _autocast_half(device):
            return FP32
    if kwargs.get("output_attentions"):
        return WEIGHTS
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


def _autocast_half(device_type: str) -> bool:
    try:
        if not torch.is_autocast_enabled(device_type):
            return False
        return torch.get_autocast_dtype(device_type) in HALF
    except TypeError:  # torch < 2.4: no device argument, CUDA only
        return torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() in HALF


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
    return {s: shared["fallback"] for s in SITUATIONS if not (s == GENERATE and generate_fa2)}


# --- arming, once per load ------------------------------------------------------------------------------


def default_backend(model_class) -> str:
    """What transformers picks when no ``attn_implementation`` is given: SDPA where the class has it, else eager."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def note(shared: dict, generate_fa2: bool) -> str:
    cannot = ", ".join(s for s in SITUATIONS if s != GENERATE)
    where = f"where FlashAttention-2 cannot run ({cannot})"
    return f"{shared['fallback']} {where}" if generate_fa2 else f"{shared['fallback']} in generate() (faster) and {where}"


def attach(model, load) -> dict:
    """Arms every component the plugin put on FlashAttention-2 (runtime/__init__.py's protocol)."""
    from transformers.modeling_utils import PreTrainedModel

    from .. import state
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
        shared = spec(key, fallback, "classes" if legacy else "config")
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
