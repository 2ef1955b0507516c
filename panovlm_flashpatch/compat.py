"""What differs between the supported transformers versions, in one place.

Each fact cites the release where transformers changed; ../shared/research/transformers-matrix.md
holds the runs that measured them. Nothing here imports transformers at module import time.
"""

from __future__ import annotations

import dataclasses
import functools
import re

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
