"""What a loaded model actually runs, per component: its attention modules, not what a config says.

On transformers 4.46-4.53 sub-models hold deep copies of their configs, so the top-level
``config.text_config`` can say ``eager`` while the tower runs SDPA; on 4.46-4.47 the backend is the
attention module's class (``Qwen2SdpaAttention``). So: find the attention modules, take the backend
from their class where the class names one, else from the config they actually read. Attention layers
of remote code that compute attention themselves (compat.AttentionCode "own") run whatever that code
runs, whatever the config says: their backend is reported as unknown.
"""

from __future__ import annotations

import dataclasses
import sys

from .compat import attention_code, config_base_class

_LEGACY_NAMES = (("FlashAttention2", "flash_attention_2"), ("Sdpa", "sdpa"))
#: The backend reported for attention layers whose own code decides what runs.
OWN_CODE = "unknown (the model's own attention code)"


@dataclasses.dataclass(frozen=True)
class Observed:
    model_class: str
    backend: str
    dtype: str | None


def class_backend(module) -> str | None:
    """Backend named by a 4.46-style attention class, or None when the class does not tell."""
    name = type(module).__name__
    for marker, backend in _LEGACY_NAMES:
        if marker in name:
            return backend
    # An eager class of a family that still has Sdpa/FlashAttention2 siblings (4.46-4.47).
    source = sys.modules.get(type(module).__module__)
    if source is not None and name.endswith("Attention"):
        stem = name[: -len("Attention")]
        if hasattr(source, f"{stem}SdpaAttention") or hasattr(source, f"{stem}FlashAttention2"):
            return "eager"
    return None


def is_attention_module(module) -> bool:
    name = type(module).__name__
    return "Attention" in name and "Pooling" not in name and "Output" not in name


def key_for(cfg, root, keys) -> str | None:
    """The component key of a module's config: ``""`` for the root, a sub-config key, or None."""
    if cfg is root:
        return ""
    for key in keys:
        if getattr(root, key, None) is cfg:  # >= 4.54: sub-models share the sub-config object
            return key
    same_type = [k for k in keys if type(getattr(root, k, None)) is type(cfg)]  # <= 4.53: deep copies
    return same_type[0] if len(same_type) == 1 else None


def modules_by_component(model, keys: tuple[str, ...]):
    """Yields ``(path, module, key)`` for every module that holds a config of one of the load's components.

    Modules are yielded in ``named_modules`` order, outermost first. For a composite load (``keys`` set),
    the composite's own top level is skipped: it is reported through its components.
    """
    base = config_base_class()
    root = model.config
    for path, module in model.named_modules():
        cfg = getattr(module, "config", None)
        if not isinstance(cfg, base):
            continue
        key = key_for(cfg, root, keys) if keys else ""
        if key is None or (keys and key == ""):
            continue
        yield path, module, key


def _own_code(module) -> bool:
    """Remote code whose attention layers call neither flash-attn nor transformers' attention functions."""
    code = attention_code(type(module))
    return code.kind == "own" and not code.module.startswith("transformers.")


def dtype_of(module) -> str | None:
    for param in module.parameters():
        if param.is_floating_point():
            return str(param.dtype).replace("torch.", "")
    return None


def observe(model, keys: tuple[str, ...]) -> dict[str, Observed]:
    """Maps each component key (``""`` for a plain model) to what its modules run."""
    root = model.config
    owners: dict[str, object] = {}
    certain: dict[str, set[str]] = {}
    from_config: dict[str, set[str]] = {}
    wanted = set(keys) if keys else {""}
    for _, module, key in modules_by_component(model, keys):
        if key not in owners and hasattr(module, "parameters"):
            owners[key] = module
        if is_attention_module(module):
            legacy = class_backend(module)
            if _own_code(module):
                certain.setdefault(key, set()).add(OWN_CODE)
            elif legacy:
                certain.setdefault(key, set()).add(legacy)
            else:
                from_config.setdefault(key, set()).add(_public(module.config._attn_implementation))
    result = {}
    for key in sorted(wanted):
        owner = owners.get(key, model)
        if _own_code(owner):  # its layers may hold no config at all: the owner's code decides
            certain[key] = {OWN_CODE}
        found = certain.get(key) or from_config.get(key)
        if not found:
            cfg = root if key == "" else getattr(root, key, None)
            found = {_public(getattr(cfg, "_attn_implementation", "unknown"))}
        backend = found.pop() if len(found) == 1 else "mixed(" + ",".join(sorted(found)) + ")"
        result[key] = Observed(model_class=type(owner).__name__, backend=backend, dtype=dtype_of(owner))
    return result


def _public(backend) -> str:
    """runtime/varlen.py's key is SDPA to the caller (packed training forwards run torch's varlen kernel there)."""
    return "sdpa" if backend == "panovlm_varlen" else str(backend)
