"""Which components a load builds, read from the model class and its config (no weights, no torch).

A plain model is one component, keyed ``""``. A composite model (LLaVA-style, or a dual encoder
such as SigLIP) is one component per sub-config key (``text_config``, ``vision_config``, ...),
which is how transformers >= 4.46 takes a per-component ``attn_implementation`` dict.
"""

from __future__ import annotations

import dataclasses
import sys

from .compat import TransformersFacts, config_base_class, supports_fa2

#: FlashAttention-2 kernels take head dimensions up to 256.
MAX_FA2_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class Component:
    """One attention-bearing part of a load.

    Attributes:
        key: ``""`` for a plain model, else the sub-config key.
        role: ``language model``, ``vision encoder``, ``text encoder``, ... (for people).
        model_class: name of the class that will be built for it (best prediction).
        supports_fa2: that class declares FlashAttention-2 support, as this transformers reads it.
        head_dim: attention head size, when the config says.
        output_attentions: the config asks for attention weights (FA2 cannot return them).
    """

    key: str
    role: str
    model_class: str
    supports_fa2: bool
    head_dim: int | None
    output_attentions: bool


def sub_config_keys(config) -> tuple[str, ...]:
    """Keys of the sub-configs that are set (``sub_configs`` from 4.51; attribute scan before)."""
    base = config_base_class()
    declared = getattr(type(config), "sub_configs", None) or {}
    keys = list(declared) if declared else [k for k, v in vars(config).items() if isinstance(v, base)]
    return tuple(k for k in keys if isinstance(getattr(config, k, None), base))


def head_dim_of(config) -> int | None:
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def role_of(config, key: str) -> str:
    model_type = str(getattr(config, "model_type", "") or "")
    if "vision" in model_type or "vision" in key or (
        hasattr(config, "image_size") and hasattr(config, "patch_size")
    ):
        return "vision encoder"
    if "audio" in model_type or "audio" in key:
        return "audio encoder"
    if model_type.endswith("_text_model"):
        return "text encoder"
    if getattr(config, "vocab_size", None) and not getattr(config, "is_encoder_decoder", False):
        return "language model"
    return key or model_type or "model"


def _class_for_sub_config(sub_config, root_class):
    """The class transformers will build for a sub-config: the AutoModel mapping first, then a
    class of the root's own module declaring that config class, then the root class itself."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        return MODEL_MAPPING[type(sub_config)]
    except Exception:  # not mapped (remote code, text towers of dual encoders), or a lazy import failed
        pass
    module = sys.modules.get(getattr(root_class, "__module__", ""), None)
    for value in vars(module).values() if module else ():
        if isinstance(value, type) and getattr(value, "config_class", None) is type(sub_config):
            return value
    return root_class


def _output_attentions(config) -> bool:
    return bool(getattr(config, "_output_attentions", False) or getattr(config, "output_attentions", False))


def components_of(model_class, config, facts: TransformersFacts, output_attentions_kwarg: bool = False):
    """Lists the components of a load.

    Args:
        model_class: the class ``from_pretrained`` was called on.
        config: its config (read, never modified).
        facts: what this transformers version honours.
        output_attentions_kwarg: ``output_attentions=True`` was passed to ``from_pretrained``.
    """
    keys = sub_config_keys(config)
    if not keys:
        return (
            Component(
                key="",
                role=role_of(config, ""),
                model_class=model_class.__name__,
                supports_fa2=supports_fa2(model_class, facts),
                head_dim=head_dim_of(config),
                output_attentions=output_attentions_kwarg or _output_attentions(config),
            ),
        )
    parts = []
    for key in keys:
        sub = getattr(config, key)
        cls = _class_for_sub_config(sub, model_class)
        parts.append(
            Component(
                key=key,
                role=role_of(sub, key),
                model_class=cls.__name__,
                supports_fa2=supports_fa2(cls, facts),
                head_dim=head_dim_of(sub),
                output_attentions=output_attentions_kwarg or _output_attentions(sub) or _output_attentions(config),
            )
        )
    # The language model first: it is what most people look for in the log.
    order = {"language model": 0, "vision encoder": 1}
    return tuple(sorted(parts, key=lambda c: order.get(c.role, 2)))
