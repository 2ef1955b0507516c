"""Tiny, randomly initialised checkpoints shaped like PanoLLaVA's parts, built from configs.

For the demo and the tests: each builder saves a checkpoint with ``save_pretrained`` into a local
folder, so loading it back goes through the real ``from_pretrained``. Nothing is downloaded.
Builders adapt to the installed transformers (Qwen3 from 4.51, else Qwen2; SigLIP2 from 4.49).
"""

from __future__ import annotations

import importlib.util
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


def build_causal_lm(path: str, family: str) -> str:
    """A tiny causal LM of another family: "qwen2", "llama", "mistral" or "gpt2" (for padding-free)."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    else:
        cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
               "mistral": transformers.MistralConfig}[family]
        config = cls(**_LM)
    return _save(transformers.AutoModelForCausalLM.from_config(config), path)


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
