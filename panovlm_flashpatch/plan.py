"""Reads one ``from_pretrained`` call into the decision's inputs: request, placement, components.

Nothing here changes the call: the config is read (from the kwargs, else from the checkpoint's
local config.json, never downloaded) and the caller's objects are left as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

from . import probe as probe_module
from . import reporting, state
from .compat import TransformersFacts, config_base_class, requested_attn
from .components import components_of
from .decide import PLUGIN_CONFIG, Decision, Placement, Request, decide
from .load import caller_dtype, dtype_name
from .settings import Settings

_OFFLOAD_TARGETS = ("cpu", "disk", "meta")
_SPREAD_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class CannotPlan(Exception):
    """The call cannot be read well enough to change it; it passes through untouched."""


@dataclasses.dataclass(frozen=True)
class Plan:
    checkpoint: str
    model_class: str
    decision: Decision
    caller_attn: object
    request: Request
    caps: object = None  # probe.Capabilities the decision read


def checkpoint_of(args, kwargs) -> str:
    value = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    return str(value) if value is not None else "<none>"


def _config_for(cls, args, kwargs):
    base = config_base_class()
    config = kwargs.get("config")
    if isinstance(config, base):
        return config
    source = config if isinstance(config, (str, os.PathLike)) else (args[0] if args else kwargs.get("pretrained_model_name_or_path"))
    config_class = getattr(cls, "config_class", None)
    if source is None or config_class is None:
        raise CannotPlan(f"{cls.__name__} has no config to read (no config_class or no checkpoint path)")
    download_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "subfolder", "token") if k in kwargs}
    try:
        # local_files_only: the plugin never downloads; transformers fetches what it needs itself.
        return config_class.from_pretrained(source, local_files_only=True, **download_kwargs)
    except Exception as exc:
        raise CannotPlan(f"could not read the config locally ({type(exc).__name__}: {reporting.sentence(exc)})") from None


def _carried(config, key: str = ""):
    """The request a config carries: the caller's own, or (a config that came out of a plugin load) what
    the caller of that load had asked for; with where it was read from."""
    ours, original = state.caller_request(config)
    if ours:
        return original, PLUGIN_CONFIG
    return requested_attn(config), "caller"


def _request(config, kwargs, keys, source, facts: TransformersFacts) -> tuple[Request, object]:
    kwarg = kwargs.get("attn_implementation")
    if kwarg is not None:
        root, root_from = kwarg, "caller"
    else:
        root, root_from = _carried(config)

    def pick(value, key):
        return value.get(key) if isinstance(value, dict) else value

    origins = {}
    if keys:
        attn = {}
        for key in keys:
            value = pick(kwarg, key) if kwarg is not None else None
            origins[key] = "caller"
            if value is None and kwarg is None:
                value, origins[key] = _carried(getattr(config, key), key)
                if value is None:
                    value, origins[key] = pick(root, key), root_from
            attn[key] = value
        root_attn = pick(root, "") if isinstance(root, dict) else root
    else:
        attn = {"": pick(root, "")}
        origins[""] = root_from
        root_attn = None
    checkpoint_dtype = dtype_name(vars(config).get("dtype", None) or vars(config).get("torch_dtype", None))
    given = dtype_name(caller_dtype(kwargs))
    request = Request(
        attn=attn,
        root_attn=root_attn,
        dtype=given,
        checkpoint_dtype=checkpoint_dtype,
        load_dtype=load_dtype(given, checkpoint_dtype, source, facts),
        requested_from={k: v for k, v in origins.items() if v != "caller"},
    )
    return request, root


def load_dtype(given: str | None, checkpoint_dtype: str | None, source, facts: TransformersFacts) -> str | None:
    """The dtype transformers alone loads this call in, resolved as it does.

    ``"auto"`` (and, on 5.x, no dtype at all) means the checkpoint's: its config's dtype, else its weights'
    (read from the safetensors header, as transformers reads the first floating-point tensor), else float32.
    No dtype on 4.x means torch's default dtype.
    """
    if given not in (None, "auto"):
        return given
    if given is None and not facts.default_dtype_is_checkpoints:
        import torch

        return dtype_name(torch.get_default_dtype())
    return checkpoint_dtype or weights_dtype(source) or "float32"


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def weights_dtype(source) -> str | None:
    """The dtype of the first floating-point tensor of a local safetensors checkpoint (its header only)."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return None
    index = os.path.join(source, "model.safetensors.index.json")
    name = "model.safetensors"
    try:
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                name = sorted(set(json.load(f)["weight_map"].values()))[0]
        with open(os.path.join(source, name), "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, KeyError, IndexError, struct.error):
        return None
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def _target(value) -> tuple[str, int | None]:
    """One device_map value -> (kind, index): ``0`` -> (cuda, 0), ``"cuda:1"`` / ``torch.device``
    -> (cuda, 1), ``"cuda"`` -> (cuda, None), ``"cpu"`` -> (cpu, None), ``"auto"`` -> (auto, None)."""
    if isinstance(value, bool):
        return str(value), None
    if isinstance(value, int):
        return "cuda", value
    kind = getattr(value, "type", None)
    if isinstance(kind, str):  # a torch.device (a str has no .type)
        index = getattr(value, "index", None)
        return kind, index if isinstance(index, int) else None
    text = str(value).strip()
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    if text.isdigit():
        return "cuda", int(text)
    return text, None


def placement_of(kwargs) -> Placement:
    """Where ``device_map`` puts the weights. Without one: LOCAL_RANK's GPU, else the current one."""
    device_map = kwargs.get("device_map")
    if device_map is None:
        rank = os.environ.get("LOCAL_RANK", "").strip()
        return Placement(devices=(int(rank),) if rank.isdigit() else None)
    values = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    devices, offload = set(), set()
    for value in values:
        kind, index = _target(value)
        if kind in _OFFLOAD_TARGETS:
            offload.add(kind)
        elif kind == "cuda" and index is not None:
            devices.add(index)
        # "cuda" alone: the current device; "auto" & co.: accelerate spreads over the visible GPUs
        # and the probe checks the current one.
    if offload:
        where = "/".join(sorted(offload))
        return Placement(offload=f"needs every module on a CUDA GPU, found device_map placing modules on {where}")
    return Placement(devices=tuple(sorted(devices)) or None)


def plan_call(cls, args, kwargs, settings: Settings, facts: TransformersFacts) -> Plan:
    """Reads the call and decides. Raises :class:`CannotPlan` when the call cannot be read."""
    if kwargs.get("use_flash_attention_2"):
        raise CannotPlan("the caller passed use_flash_attention_2; left alone")
    config = _config_for(cls, args, kwargs)
    components = components_of(cls, config, facts, output_attentions_kwarg=bool(kwargs.get("output_attentions")))
    keys = tuple(c.key for c in components if c.key)
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    if kwargs.get("subfolder") and isinstance(source, (str, os.PathLike)):
        source = os.path.join(source, kwargs["subfolder"])
    request, caller_attn = _request(config, kwargs, keys, source, facts)
    placement = placement_of(kwargs)
    # Looked up through the module on every call: the one seam tests replace.
    caps = probe_module.probe(placement.devices)
    decision = decide(request, caps, components, placement, settings, facts)
    return Plan(
        checkpoint=checkpoint_of(args, kwargs),
        model_class=cls.__name__,
        decision=decision,
        caller_attn=caller_attn,
        request=request,
        caps=caps,
    )
