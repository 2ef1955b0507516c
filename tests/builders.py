"""Tiny checkpoints that only the tests need (the demo's live in panovlm_flashpatch/tiny.py).

Each is built from a config with the installed transformers' own classes and saved with
``save_pretrained``, so loading it back goes through the real ``from_pretrained``.
"""

from __future__ import annotations

import os

import torch
import transformers

from panovlm_flashpatch import tiny

_TEXT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def _save(model, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path


def encoder_configs() -> dict:
    """Bidirectional text encoders and an audio encoder: model name -> (config, class name to load)."""
    found = {
        "bert": (transformers.BertConfig(**_TEXT), "BertModel"),
        "roberta": (transformers.RobertaConfig(**_TEXT), "RobertaModel"),
        "xlm-roberta": (transformers.XLMRobertaConfig(**_TEXT), "XLMRobertaModel"),
        "distilbert": (transformers.DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                     max_position_embeddings=64), "DistilBertModel"),
        "whisper-encoder": (transformers.WhisperConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                                      encoder_attention_heads=4, decoder_attention_heads=4,
                                                      encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                                                      max_source_positions=32, max_target_positions=32),
                            "WhisperForAudioClassification"),
    }
    if hasattr(transformers, "ModernBertConfig"):
        found["modernbert"] = (transformers.ModernBertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, intermediate_size=64,
                                                             max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                                             eos_token_id=2, cls_token_id=1, sep_token_id=2),
                               "ModernBertModel")
    return found


def build_encoder(path: str, name: str) -> tuple[str, str]:
    config, class_name = encoder_configs()[name]
    torch.manual_seed(0)
    return _save(getattr(transformers, class_name)(config), path), class_name


def build_lm_in(path: str, dtype) -> str:
    """The tiny LM, saved in ``dtype`` (its config records it, as a real fp16/bf16 checkpoint's does)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny.lm_config()).to(dtype)
    return _save(model, path)


_OWN_ATTENTION = '''
import torch
from torch import nn
from transformers import PreTrainedModel, {base}Config


class OwnAttentionConfig({base}Config):
    model_type = "own-attention"


class OwnSelfAttention(nn.Module):
    """Attention computed here, whatever config._attn_implementation says (as much remote code does)."""

    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        return (w @ v).transpose(1, 2).reshape(b, s, -1)


class OwnAttentionModel(PreTrainedModel):
    config_class = OwnAttentionConfig
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(OwnSelfAttention(config) for _ in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = x + layer(x)
        return (x,)
'''


def build_own_attention_remote_code(path: str) -> str:
    """A trust_remote_code model that declares FlashAttention-2 support but computes attention itself."""
    base = "Qwen3" if tiny.has_qwen3() else "Qwen2"
    return tiny.save_remote_code(path, _OWN_ATTENTION.format(base=base), "modeling_own_attention", "OwnAttentionConfig",
                                 "OwnAttentionModel")


def build_phi3_classifier(path: str) -> str:
    """A tiny Phi-3 sequence classifier with a word-level tokenizer: what pipeline("text-classification") loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(126)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    config = transformers.Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     pad_token_id=0, num_labels=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    _save(transformers.Phi3ForSequenceClassification(config), path)
    tokenizer.save_pretrained(path)
    return path


_SUBCLASSED_ATTENTION = '''
import torch
from transformers import {base}Config, {base}Model
from transformers.models.{lower}.modeling_{lower} import {base}Attention


class SubAttnConfig({base}Config):
    model_type = "sub-attention"


class MyAttention({base}Attention):
    """A transformers attention layer whose forward remote code rewrote to compute attention itself."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None


class SubAttnModel({base}Model):
    config_class = SubAttnConfig

    def __init__(self, config):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = MyAttention(config, i)
'''


def build_subclassed_attention_remote_code(path: str) -> str:
    """Remote code subclassing a transformers model and its attention layer, with its own attention forward."""
    base = "Qwen3" if tiny.has_qwen3() else "Qwen2"
    source = _SUBCLASSED_ATTENTION.format(base=base, lower=base.lower())
    return tiny.save_remote_code(path, source, "modeling_sub_attention", "SubAttnConfig", "SubAttnModel")
