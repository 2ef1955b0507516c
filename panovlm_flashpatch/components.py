"""Which components a load builds, read from the model class and its config (no weights, no torch).

A plain model is one component, keyed ``""``. A composite model (LLaVA-style, or a dual encoder
such as SigLIP) is one component per sub-config key (``text_config``, ``vision_config``, ...),
which is how transformers >= 4.46 takes a per-component ``attn_implementation`` dict.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

from .compat import AttentionCode, TransformersFacts, attention_code, config_base_class, supports_fa2

#: FlashAttention-2 kernels take head dimensions up to 256.
MAX_FA2_HEAD_DIM = 256
#: Composite models whose masks are not causal-only: FlashAttention-2 would drop them (and transformers'
#: per-sub-config check would not stop it). transformers 5.x marks these classes ``_supports_flash_attn = False``
#: itself ("Flash Attention drops the bidirectional mask over image tokens"; mllama: "Constructs 4D masks");
#: 4.x does not, so the plugin keeps its own list, for every version.
NON_CAUSAL_PREFIX_TYPES = {
    "paligemma": "keeps a bidirectional mask over its image and prompt prefix",
    "gemma3": "keeps a bidirectional mask over its image tokens",
    "gemma4": "keeps a bidirectional mask over its image tokens",
    "gemma4_unified": "keeps a bidirectional mask over its image tokens",
    "diffusion_gemma": "keeps a bidirectional mask over its image tokens",
    "molmo2": "keeps a bidirectional mask over its image tokens",
    "mllama": "builds 4D cross-attention masks",
}


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
        attention: how that class computes attention (can its backend switch per forward?).
        default_backend: what transformers gives it when no backend is asked for (SDPA where the class
            has it, else eager).
        refusal: why the load as a whole must not run FlashAttention-2 (a composite whose own class refuses it,
            or whose masks are not causal-only), else None.
    """

    key: str
    role: str
    model_class: str
    supports_fa2: bool
    head_dim: int | None
    output_attentions: bool
    attention: AttentionCode = AttentionCode("unknown")
    default_backend: str = "sdpa"
    refusal: str | None = None


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


LANGUAGE_MODEL = "language model"
VISION_ENCODER = "vision encoder"
TEXT_ENCODER = "text encoder"
AUDIO_ENCODER = "audio encoder"
ENCODER_DECODER = "encoder-decoder model"


@functools.lru_cache(maxsize=1)
def _task_model_types() -> dict[str, frozenset]:
    """Model types by what transformers' own task mappings say they are (read once)."""
    from transformers.models.auto import modeling_auto as auto

    def types(*names):
        found = set()
        for name in names:
            found.update(getattr(auto, name, {}) or {})
        return frozenset(found)

    def classes(*names):
        found = set()
        for name in names:
            for entry in (getattr(auto, name, {}) or {}).values():
                found.update((entry,) if isinstance(entry, str) else entry)
        return frozenset(found)

    return {
        "causal": types("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
        # Masked-LM types are bidirectional text encoders (BERT, RoBERTa, XLM-R, DistilBERT, ModernBERT, ...),
        # even the ones that also have a causal-LM head for decoder use (then config.is_decoder says so).
        "masked": types("MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
        "audio": types("MODEL_FOR_CTC_MAPPING_NAMES", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
                       "MODEL_FOR_AUDIO_XVECTOR_MAPPING_NAMES", "MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING_NAMES",
                       "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
        "audio_encoder_classes": classes("MODEL_FOR_CTC_MAPPING_NAMES", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
                                         "MODEL_FOR_AUDIO_XVECTOR_MAPPING_NAMES",
                                         "MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING_NAMES"),
    }


def _related_types(model_class) -> set[str]:
    """Model types of the config classes along the MRO: remote code subclassing Qwen3Model is a qwen3 model."""
    found = set()
    for klass in getattr(model_class, "__mro__", ()):
        model_type = getattr(getattr(klass, "config_class", None), "model_type", None)
        if isinstance(model_type, str) and model_type:
            found.add(model_type)
    return found


def role_of(config, key: str, model_class=None) -> str:
    """What a component is, for people and for the encoder rule: a causal decoder is a "language model";
    bidirectional text, vision and audio models are encoders (the vocabulary size tells neither).

    ``model_class``: the class that will be built for it (or its name).
    """
    model_type = str(getattr(config, "model_type", "") or "")
    related = _related_types(model_class) | {model_type}
    model_class = getattr(model_class, "__name__", model_class) or ""
    if "vision" in model_type or "vision" in key or (hasattr(config, "image_size") and hasattr(config, "patch_size")):
        return VISION_ENCODER
    try:
        tasks = _task_model_types()
    except Exception:  # an auto mapping that fails to import: judge by the config alone
        tasks = {"causal": frozenset(), "masked": frozenset(), "audio": frozenset(), "audio_encoder_classes": frozenset()}
    encoder_class = model_class.endswith(("Encoder", "EncoderModel")) or model_class in tasks["audio_encoder_classes"]
    audio = ("audio" in model_type or "audio" in key or "speech" in model_type or model_type in tasks["audio"]
             or hasattr(config, "num_mel_bins"))
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    if audio:
        return AUDIO_ENCODER if (encoder_class or not enc_dec) else ENCODER_DECODER
    if model_type.endswith("_text_model") or "text_encoder" in key:
        return TEXT_ENCODER
    if model_type in tasks["masked"] and not getattr(config, "is_decoder", False) and not enc_dec:
        return TEXT_ENCODER
    if enc_dec:
        return TEXT_ENCODER if encoder_class else ENCODER_DECODER
    if encoder_class:
        return TEXT_ENCODER
    if related & tasks["causal"] or model_class.endswith(("ForCausalLM", "LMHeadModel")):
        return LANGUAGE_MODEL
    if getattr(config, "vocab_size", None) and getattr(config, "is_decoder", False):
        return LANGUAGE_MODEL
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


def composite_refusal(model_class, config, facts: TransformersFacts) -> str | None:
    """Why a composite load must not run FlashAttention-2 in any of its parts, or None.

    transformers checks the loaded class's own flag for a string request; for the per-sub-config dict the
    plugin passes, it checks only each part's class, so the plugin checks the whole here.
    """
    why = NON_CAUSAL_PREFIX_TYPES.get(str(getattr(config, "model_type", "")))
    if why:
        return f"{model_class.__name__} {why}, which FlashAttention-2 would drop"
    if not supports_fa2(model_class, facts):
        return f"{model_class.__name__} does not support FlashAttention-2 (the composite's own class)"
    return None


def _default_backend(model_class) -> str:
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


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
                role=role_of(config, "", model_class),
                model_class=model_class.__name__,
                supports_fa2=supports_fa2(model_class, facts),
                head_dim=head_dim_of(config),
                output_attentions=output_attentions_kwarg or _output_attentions(config),
                attention=attention_code(model_class),
                default_backend=_default_backend(model_class),
            ),
        )
    refusal = composite_refusal(model_class, config, facts)
    parts = []
    for key in keys:
        sub = getattr(config, key)
        cls = _class_for_sub_config(sub, model_class)
        parts.append(
            Component(
                key=key,
                role=role_of(sub, key, cls),
                model_class=cls.__name__,
                supports_fa2=supports_fa2(cls, facts),
                head_dim=head_dim_of(sub),
                output_attentions=output_attentions_kwarg or _output_attentions(sub) or _output_attentions(config),
                attention=attention_code(cls),
                default_backend=_default_backend(cls),
                refusal=refusal,
            )
        )
    # The language model first: it is what most people look for in the log.
    order = {LANGUAGE_MODEL: 0, VISION_ENCODER: 1}
    return tuple(sorted(parts, key=lambda c: order.get(c.role, 2)))
