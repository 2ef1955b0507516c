"""Tiny, randomly initialised checkpoints shaped like PanoLLaVA's parts, built from configs.

For the demo and the tests: each builder saves a checkpoint with ``save_pretrained`` into a local
folder, so loading it back goes through the real ``from_pretrained``. Nothing is downloaded.
Builders adapt to the installed transformers (Qwen3 from 4.51, else Qwen2; SigLIP2 from 4.49).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
import textwrap

import torch
import transformers

_LM = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _save(model, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path


def has_qwen3() -> bool:
    return hasattr(transformers, "Qwen3ForCausalLM")


def has_siglip2() -> bool:
    return hasattr(transformers, "Siglip2VisionModel")


def lm_config(**overrides):
    """A Qwen3-style config (Qwen2 on transformers without Qwen3), GQA 4 query / 2 kv heads."""
    cls = getattr(transformers, "Qwen3Config", None) or transformers.Qwen2Config
    kwargs = dict(_LM)
    if cls.__name__ == "Qwen3Config":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return cls(**kwargs)


def build_lm(path: str, **overrides) -> str:
    torch.manual_seed(0)
    return _save(transformers.AutoModelForCausalLM.from_config(lm_config(**overrides)), path)


#: Families build_causal_lm knows -> the transformers config class (by name: a class the installed
#: transformers lacks, e.g. Gemma3TextConfig before 4.50, only matters when that family is built).
_FAMILY_CONFIGS = {
    "gpt2": "GPT2Config", "qwen2": "Qwen2Config", "llama": "LlamaConfig", "mistral": "MistralConfig",
    "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config",
    "qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig",
}
#: Families that are not causal LMs by transformers' mapping: saved as their image-text model.
_FAMILY_MODELS = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
#: Sliding window of the tiny Gemma2/Gemma3: shorter than the test rows, so the window really applies.
SLIDING_WINDOW = 4


def has_family(family: str) -> bool:
    """The installed transformers has ``family``'s config and model class (build_causal_lm can build it)."""
    if family not in _FAMILY_CONFIGS:
        return False
    return hasattr(transformers, _FAMILY_CONFIGS[family]) and hasattr(transformers, family_class_name(family))


def family_class_name(family: str) -> str:
    """The class a checkpoint of ``family`` loads as (AutoModelForCausalLM's, except for the VL families)."""
    if family in _FAMILY_MODELS:
        return _FAMILY_MODELS[family]
    return {"gpt2": "GPT2LMHeadModel", "gemma3_text": "Gemma3ForCausalLM"}.get(
        family, _FAMILY_CONFIGS[family].replace("Config", "ForCausalLM"))


def family_config(family: str, **overrides):
    """The tiny config of ``family``: hidden 64, 4 heads / 2 kv heads of 16, vocab 128, tied embeddings.

    Gemma2/Gemma3 get 4 layers, sliding (window SLIDING_WINDOW) and global alternating; Gemma2 soft-caps
    attention and final logits at values its tiny logits reach (so the caps bend them). Phi3 rotates half of
    each head (partial_rotary_factor 0.5). The VL families get a 1-block vision tower and multimodal RoPE."""
    if not has_family(family):
        raise ValueError(f"transformers {transformers.__version__} has no {family!r} ({_FAMILY_CONFIGS.get(family)})")
    cls = getattr(transformers, _FAMILY_CONFIGS[family])
    if family == "gpt2":
        return cls(**{**dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256), **overrides})
    kwargs = dict(_LM)
    if family in ("gemma", "gemma2", "gemma3_text", "phi3"):
        kwargs.update(head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gemma2":
        # Layer i slides when i is even (every version's default); query_pre_attn_scalar = head_dim.
        kwargs.update(num_hidden_layers=4, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=16,
                      attn_logit_softcapping=0.05, final_logit_softcapping=0.5)
    elif family == "gemma3_text":
        # The default pattern (5 sliding : 1 global) would make all 4 layers sliding.
        kwargs.update(num_hidden_layers=4, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=16,
                      layer_types=["sliding_attention", "full_attention"] * 2)
    elif family == "phi3":
        kwargs.pop("head_dim")  # Phi3 derives it (64 / 4)
        kwargs.update(partial_rotary_factor=0.5)
    elif family in _FAMILY_MODELS:
        return _vl_config(family, cls, kwargs, overrides)
    kwargs.update(overrides)
    return cls(**kwargs)


def _vl_config(family, cls, text, overrides):
    """Qwen2-VL / Qwen2.5-VL: text part like the others, multimodal RoPE sections 2+3+3 (of head_dim / 2)."""
    text = {**text, "bos_token_id": None, "eos_token_id": None,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [2, 3, 3]}, **overrides}
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4)
    else:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4, patch_size=4,
                      window_size=16, fullatt_block_indexes=[0])
    tokens = dict(image_token_id=125, video_token_id=126, vision_start_token_id=123, vision_end_token_id=124)
    if "text_config" in inspect.signature(cls.__init__).parameters:  # 4.52+: a text sub-config
        return cls(text_config=text, vision_config=vision, **tokens)
    return cls(vision_config=vision, **text, **tokens)  # older: one flat config


def build_causal_lm(path: str, family: str, **overrides) -> str:
    """A tiny causal LM of another family (for padding-free): see family_config. "qwen2_vl"/"qwen2_5_vl" save
    their image-text model (not in AutoModelForCausalLM's mapping: load it with family_class_name's class)."""
    torch.manual_seed(0)
    config = family_config(family, **overrides)
    if family in _FAMILY_MODELS:
        model = getattr(transformers, _FAMILY_MODELS[family])(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return _save(model, path)


def siglip_vision_config():
    return transformers.SiglipVisionConfig(image_size=32, patch_size=8, **_VISION)


def siglip2_vision_config():
    return transformers.Siglip2VisionConfig(num_patches=16, patch_size=8, **_VISION)


def build_siglip_vision(path: str) -> str:
    torch.manual_seed(0)
    return _save(transformers.SiglipVisionModel(siglip_vision_config()), path)


def build_siglip2_vision(path: str) -> str:
    torch.manual_seed(0)
    return _save(transformers.Siglip2VisionModel(siglip2_vision_config()), path)


def build_siglip(path: str) -> str:
    """A full SigLIP (text + vision): what ``AutoModel.from_pretrained(siglip_name)`` builds."""
    torch.manual_seed(0)
    text = dict(vocab_size=128, max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3, **_VISION)
    config = transformers.SiglipConfig(text_config=text, vision_config=siglip_vision_config().to_dict())
    return _save(transformers.SiglipModel(config), path)


def build_siglip2(path: str) -> str:
    """A full SigLIP2 (text + vision), PanoLLaVA's default vision family."""
    torch.manual_seed(0)
    text = dict(vocab_size=128, max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3, **_VISION)
    config = transformers.Siglip2Config(text_config=text, vision_config=siglip2_vision_config().to_dict())
    return _save(transformers.Siglip2Model(config), path)


def build_clip_vision(path: str) -> str:
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=16, **_VISION)
    return _save(transformers.CLIPVisionModel(config), path)


def build_dinov2(path: str) -> str:
    torch.manual_seed(0)
    return _save(transformers.Dinov2Model(dinov2_config()), path)


def dinov2_config():
    return transformers.Dinov2Config(image_size=32, patch_size=8, **_VISION)


def build_llava(path: str, vision: str = "siglip2") -> str:
    """A LLaVA-style composite: the tiny LM as text tower, a SigLIP/SigLIP2/DINOv2 vision tower."""
    torch.manual_seed(0)
    vision_config = {"siglip2": siglip2_vision_config, "siglip": siglip_vision_config, "dinov2": dinov2_config}[vision]()
    config = transformers.LlavaConfig(
        text_config=lm_config().to_dict(),
        vision_config=vision_config.to_dict(),
        image_token_index=127,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return _save(transformers.LlavaForConditionalGeneration(config), path)


_REMOTE_CODE = '''
from transformers import {base}Config, {base}Model


class TinyRemoteConfig({base}Config):
    model_type = "tiny-remote"


class TinyRemoteModel({base}Model):
    """Remote-code model: declares FlashAttention-2 support under both the old and new flag."""

    config_class = TinyRemoteConfig
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
'''


def build_remote_code(path: str) -> str:
    """A checkpoint whose classes live in the checkpoint folder (``trust_remote_code=True``)."""
    base = "Qwen3" if has_qwen3() else "Qwen2"
    return save_remote_code(path, _REMOTE_CODE.format(base=base), "modeling_tiny_remote", "TinyRemoteConfig",
                            "TinyRemoteModel")


def save_remote_code(path: str, source: str, module_name: str, config_name: str, model_name: str) -> str:
    """Saves a checkpoint of the model class ``model_name`` defined in ``source`` (remote code), from the tiny LM config."""
    # The source is written elsewhere: save_pretrained copies it into the checkpoint folder.
    source_dir = tempfile.mkdtemp(prefix="tiny_remote_src_")
    file = os.path.join(source_dir, f"{module_name}.py")
    with open(file, "w") as f:
        f.write(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    # save_pretrained copies the defining module's file, which it finds through sys.modules.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        config_class, model_class = getattr(module, config_name), getattr(module, model_name)
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModel")
        torch.manual_seed(0)
        return _save(model_class(config_class(**lm_config().to_dict())), path)
    finally:
        sys.modules.pop(spec.name, None)
        shutil.rmtree(source_dir, ignore_errors=True)


def padding_mask(lengths, width: int | None = None, side: str = "right"):
    """A (len(lengths), width) attention mask: 1 on each row's ``lengths[i]`` real tokens, padded on ``side``."""
    width = max(lengths) if width is None else width
    steps = torch.arange(width)[None, :]
    counts = torch.tensor(list(lengths))[:, None]
    real = steps < counts if side == "right" else steps >= width - counts
    return real.long()


def lm_inputs(batch: int = 2, length: int = 8):
    torch.manual_seed(1)
    ids = torch.randint(0, 120, (batch, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def pixel_inputs(batch: int = 2):
    torch.manual_seed(2)
    return {"pixel_values": torch.randn(batch, 3, 32, 32)}
