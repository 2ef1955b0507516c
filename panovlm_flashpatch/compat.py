"""What differs between the supported transformers versions, in one place.

Each fact cites the release where transformers changed; ../shared/research/transformers-matrix.md
holds the runs that measured them. Nothing here imports transformers at module import time.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import sys

#: Oldest supported release: the first that takes a per-sub-config dict for attn_implementation.
MIN_SUPPORTED = (4, 46)
#: First release we do not claim to support (a new major may move the attention checks again).
MAX_EXCLUSIVE = (6, 0)


def parse_version(text: str) -> tuple[int, int, int]:
    """``"4.57.0.dev0"`` -> ``(4, 57, 0)``; missing parts count as 0."""
    parts = [int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class TransformersFacts:
    version: str
    #: Keyword that carries the dtype: ``torch_dtype`` before 4.56 (``dtype=`` is a TypeError there).
    dtype_kwarg: str
    #: Class flags that declare FlashAttention-2 support, as this release's dispatch reads them:
    #: ``_supports_flash_attn_2`` up to 4.53, either from 4.54, only ``_supports_flash_attn`` from 5.4.
    fa2_flags: tuple[str, ...]
    #: transformers >= 4.48 casts float32 q/k/v to the autocast dtype before the FA2 kernel.
    fa2_autocasts_fp32: bool
    #: With no dtype given, transformers 4.x loads torch's default dtype (float32); 5.x the checkpoint's.
    default_dtype_is_checkpoints: bool = False

    @property
    def supported(self) -> bool:
        return MIN_SUPPORTED <= parse_version(self.version)[:2] < MAX_EXCLUSIVE


def facts_for(version: str) -> TransformersFacts:
    v = parse_version(version)[:2]
    if v < (4, 54):
        flags: tuple[str, ...] = ("_supports_flash_attn_2",)
    elif v < (5, 4):
        flags = ("_supports_flash_attn", "_supports_flash_attn_2")
    else:
        flags = ("_supports_flash_attn",)
    return TransformersFacts(
        version=version,
        dtype_kwarg="dtype" if v >= (4, 56) else "torch_dtype",
        fa2_flags=flags,
        fa2_autocasts_fp32=v >= (4, 48),
        default_dtype_is_checkpoints=v >= (5, 0),
    )


@functools.lru_cache(maxsize=1)
def transformers_facts() -> TransformersFacts:
    import transformers

    return facts_for(transformers.__version__)


def config_base_class():
    """``PreTrainedConfig`` (5.x) or ``PretrainedConfig`` (4.x)."""
    import transformers

    return getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig


def supports_fa2(model_class, facts: TransformersFacts) -> bool:
    return any(bool(getattr(model_class, flag, False)) for flag in facts.fa2_flags)


def requested_attn(config) -> object:
    """The attn_implementation a config carries as an explicit request (None when unset).

    Reads the private ``_attn_implementation_internal``: on 4.x the public property never returns
    None ("always fall back on eager"), so it cannot tell an unset request from ``"eager"``.
    """
    return getattr(config, "_attn_implementation_internal", None)


@dataclasses.dataclass(frozen=True)
class AttentionCode:
    """How a model class computes attention, read from the source of the module that defines its attention layers.

    Attributes:
        kind: ``"interface"``: its layers pick the backend from the config at every forward (transformers'
            attention interface, >= 4.48 for most families); ``"classes"``: one attention class per backend
            (``Qwen2FlashAttention2`` / ``Qwen2SdpaAttention``, 4.46-4.47), with the mask built from the config
            at every forward; ``"fixed"``: FlashAttention-2 code with no way to switch per forward (no SDPA
            counterpart, or the backend cached at construction); ``"own"``: attention layers that call neither
            flash-attn nor transformers' attention functions (remote code that computes attention itself);
            ``"unknown"``: no readable source.
        module: the module that defines the attention layers.
    """

    kind: str
    module: str = ""

    @property
    def switchable(self) -> bool:
        """The plugin can switch this model's backend per forward (runtime/dispatch.py)."""
        return self.kind in ("interface", "classes")


_ATTENTION_CLASS = re.compile(r"^class \w*Attention\w*\((?:nn|torch\.nn)\.Module\)", re.MULTILINE)
# Code that runs a flash-attn kernel (the class flags "_supports_flash_attn" do not count).
_CALLS_FLASH = re.compile(r"\bimport flash_attn|\bfrom flash_attn|flash_attn_(?:varlen_)?func|flash_attention_forward\(")
_NOT_MODEL_CODE = ("builtins", "typing", "torch.", "transformers.modeling_utils", "transformers.generation",
                   "transformers.integrations", "transformers.utils")


@functools.lru_cache(maxsize=None)
def _module_source(name: str) -> str | None:
    module = sys.modules.get(name)
    try:
        return inspect.getsource(module) if module is not None else None
    except (OSError, TypeError):  # a class defined in a REPL or notebook, or a file gone since import
        return None


_DISPATCHES = re.compile(r"ALL_ATTENTION_FUNCTIONS|attention_interface|super\(\)\.forward|flash_attn_(?:varlen_)?func|"
                         r"flash_attention_forward\(")


def _own_attention_forward(code: str) -> bool:
    """The module defines an attention class (any base) whose own ``forward`` computes attention itself:
    it neither dispatches through transformers' attention functions nor calls flash-attn or its parent's forward."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and "Attention" in node.name:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == "forward":
                    if not _DISPATCHES.search(ast.get_source_segment(code, item) or ""):
                        return True
    return False


@functools.lru_cache(maxsize=None)
def attention_code(model_class) -> AttentionCode:
    """Reads the first module along ``model_class``'s MRO that defines attention layers (see AttentionCode).

    Inheritance is followed because remote code often subclasses a transformers model and keeps its layers.
    """
    unreadable = ""
    for klass in model_class.__mro__:
        name = klass.__module__
        if name.startswith(_NOT_MODEL_CODE):
            continue
        code = _module_source(name)
        if code is None:
            unreadable = unreadable or name
            continue
        if not name.startswith("transformers.") and _own_attention_forward(code):
            # Remote code whose attention layer (a subclass of a transformers one, say) runs its own forward.
            return AttentionCode("own", name)
        if not _ATTENTION_CLASS.search(code):
            continue
        if "ALL_ATTENTION_FUNCTIONS" in code:
            return AttentionCode("interface", name)
        per_backend = (re.search(r"^class \w+FlashAttention2\(", code, re.MULTILINE)
                       and re.search(r"^class \w+SdpaAttention\(", code, re.MULTILINE))
        if per_backend and not re.search(r"_use_flash_attention_2|_use_sdpa\b", code):
            return AttentionCode("classes", name)
        if _CALLS_FLASH.search(code):
            return AttentionCode("fixed", name)
        return AttentionCode("own", name)
    return AttentionCode("unknown", unreadable)


def autocast_half_dtype(device_type: str):
    """The half-precision dtype torch's autocast casts to on ``device_type`` now, or None (autocast off, or not half).

    torch < 2.4 takes no device argument (CUDA only)."""
    import torch

    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        dtype = torch.get_autocast_dtype(device_type)
    except TypeError:
        if not torch.is_autocast_enabled():
            return None
        dtype = torch.get_autocast_gpu_dtype()
    return dtype if dtype in (torch.float16, torch.bfloat16) else None
