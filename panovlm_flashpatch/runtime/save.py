"""``save_pretrained`` writes the checkpoint's own dtype when the plugin loaded it in another one.

Why: with no dtype given, the plugin loads a float32 checkpoint in bfloat16 (the product rule: bf16 where
transformers would load float32). Plain transformers would have kept float32 in memory and on disk. Saving
the bfloat16 weights as they are would silently turn the user's float32 checkpoint into a bfloat16 one for
everyone who loads it next (``merge_and_unload().save_pretrained()`` included). So a model the plugin
loaded that way saves its floating-point weights as float32 and writes ``float32`` into config.json: the
saved checkpoint has the format of the one that was loaded, as without the plugin.

What no save can give back is the precision lost at load: the values carry bfloat16's precision since
then. One warning per model says so at its first save and names the fix (load with
``dtype=torch.float32``; FlashAttention-2 then runs under ``torch.autocast``, other forwards on SDPA).

Left as transformers writes it, with the warning saying so: ``push_to_hub=True`` (transformers uploads the
config itself, before it could be corrected); a conversion that fails (no memory for the float32 copy). A
model whose dtype the user changed after the load is saved as it is, silently: that dtype is theirs.
The float32 copy is made on the CPU, one tensor at a time into one dict (tensors that share storage stay
shared, so tied weights are still saved once); the GPU holds nothing more during the save.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from .. import _safety, reporting, state
from .._wrapping import Slot

_MARKER = "_self_panovlm_flashpatch_save"


def arm(model, checkpoint_dtype: str, loaded_dtype: str, checkpoint: str) -> None:
    state.ensure(model)["save"] = {"checkpoint_dtype": checkpoint_dtype, "loaded_dtype": loaded_dtype,
                                   "checkpoint": checkpoint, "warned": False}
    install()


def attach(model, load) -> dict:
    """runtime/__init__.py's protocol: armed when the plugin injected a dtype over a float32 checkpoint."""
    from . import Effect

    injected = load.decision.inject_dtype
    if not injected or load.load_dtype != "float32":
        return {}
    arm(model, "float32", injected, load.checkpoint)
    return {None: Effect(note="save_pretrained writes float32, the checkpoint's dtype")}


def _save(wrapped, instance, args, kwargs):
    st = state.of(instance) if instance is not None else None
    info = st.get("save") if state.live(st) else None
    if not info:
        return wrapped(*args, **kwargs)
    try:
        loaded = getattr(torch, info["loaded_dtype"])
        if instance.dtype != loaded:
            return wrapped(*args, **kwargs)  # the user changed the dtype after the load: theirs
        target = getattr(torch, info["checkpoint_dtype"])
        if kwargs.get("push_to_hub"):
            _warn(instance, info, kept=False, why="push_to_hub=True uploads transformers' own config")
            return wrapped(*args, **kwargs)
        converted = _converted(kwargs.get("state_dict") or instance.state_dict(), loaded, target)
    except Exception as exc:  # no memory for the copy, or a bug of ours: save as transformers would
        if not isinstance(exc, MemoryError) and type(exc).__name__ != "OutOfMemoryError":
            _safety.absorb("save_pretrained", exc, "the model was saved in its in-memory dtype")
        _warn(instance, info, kept=False, why=f"converting to {info['checkpoint_dtype']} failed ({type(exc).__name__})")
        return wrapped(*args, **kwargs)
    result = wrapped(*args, **{**kwargs, "state_dict": converted})
    directory = args[0] if args else kwargs.get("save_directory")
    try:
        _rewrite_config(directory, info["loaded_dtype"], info["checkpoint_dtype"])
    except Exception as exc:
        _safety.absorb("save_pretrained", exc, "config.json keeps the in-memory dtype")
    _warn(instance, info, kept=True)
    return result


def _converted(state_dict: dict, source, target) -> dict:
    """A new dict: ``source``-dtype tensors as ``target`` on the CPU, shared storage still shared."""
    done: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != source:
            out[name] = tensor
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()))
        if key not in done:
            done[key] = tensor.detach().to(device="cpu", dtype=target)
        out[name] = done[key]
    return out


def _rewrite_config(directory, loaded: str, target: str) -> None:
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)

    def fix(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("dtype", "torch_dtype") and value == loaded:
                    node[key] = target
                else:
                    fix(value)

    fix(config)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _warn(model, info: dict, kept: bool, why: str = "") -> None:
    if info.get("warned"):
        return
    info["warned"] = True
    ckpt, loaded, saved = info["checkpoint"], info["loaded_dtype"], info["checkpoint_dtype"]
    fix = (f"To keep full {saved} precision, load it with dtype=torch.{saved} (FlashAttention-2 then runs under "
           "torch.autocast, other forwards on SDPA).")
    if kept:
        message = (f"{type(model).__name__} [{ckpt}] was loaded in {loaded} by panovlm_flashpatch (no dtype was given; "
                   f"the checkpoint is {saved}). save_pretrained wrote {saved}, the checkpoint's dtype, but the values "
                   f"carry {loaded} precision since that load. {fix}")
    else:
        message = (f"{type(model).__name__} [{ckpt}] was loaded in {loaded} by panovlm_flashpatch (no dtype was given; "
                   f"the checkpoint is {saved}) and is saved in {loaded}: {why}. {fix}")
    reporting.emit(logging.WARNING, message)


_SLOT = Slot("transformers.modeling_utils", "PreTrainedModel", "save_pretrained", _save, _MARKER)
install, uninstall = _SLOT.install, _SLOT.uninstall
