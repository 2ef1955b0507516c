"""The decision: which attention backend and dtype to ask transformers for, per component.

A pure function of the caller's request, the probe's :class:`~.probe.Capabilities`, the load's
components, the load's placement and our settings. It never imports torch or transformers, so
it can be tested as a table. Every backend that is not chosen gets a reason.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from .components import MAX_FA2_HEAD_DIM, Component
from .compat import TransformersFacts
from .probe import Capabilities
from .settings import Settings

FA2 = "flash_attention_2"
#: Requests the plugin may upgrade. Anything else is the caller's explicit choice and is left alone.
UPGRADABLE = (None, "sdpa")
#: Roles that keep SDPA unless PANOVLM_FLASHPATCH_ENCODERS_FA2 is set: their sequences are short and
#: unpadded, where FlashAttention-2 has nothing to win over SDPA (which itself dispatches to flash/cuDNN
#: kernels). Measured on an H100: a SigLIP-base tower, fwd+bwd at 224 px, ran 0.90x with FA2
#: (benchmarks/results/results.md); public CLIP data show FA2 no faster on the vision tower and
#: slower on the text tower.
ENCODER_ROLES = ("vision encoder", "text encoder", "audio encoder")
ENCODER_REASON = (
    "encoders keep SDPA: FlashAttention-2 measured slower for a SigLIP-base tower "
    "(0.90x on an H100, benchmarks/results); PANOVLM_FLASHPATCH_ENCODERS_FA2=1 to use it"
)
#: Dtype names that FlashAttention-2 runs in directly.
HALF_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the weights will live, read from ``device_map``.

    Attributes:
        offload: a reason when part of the model goes to cpu/disk/meta, else None.
        devices: CUDA indices named by ``device_map`` (None: the current device / LOCAL_RANK).
    """

    offload: str | None = None
    devices: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """What the caller asked for.

    Attributes:
        attn: per component key, the caller's attn_implementation (None when unset).
        root_attn: the caller's request for the top-level config of a composite (None when unset).
        dtype: the caller's dtype as a name (``"float32"``, ``"auto"``, ...), None when not given.
        checkpoint_dtype: the dtype recorded in the checkpoint's config, for ``dtype="auto"``.
    """

    attn: Mapping[str, object]
    root_attn: object = None
    dtype: str | None = None
    checkpoint_dtype: str | None = None


@dataclasses.dataclass(frozen=True)
class Choice:
    """The decision for one component.

    Attributes:
        component: what is decided for.
        requested: the caller's request for it.
        backend: what we ask transformers for (None: leave it unset, transformers picks SDPA or eager).
        upgraded: ``backend`` differs from the caller's request.
        reason: why, in one line.
        rejected: backend -> reason it was not chosen.
    """

    component: Component
    requested: object
    backend: object
    upgraded: bool
    reason: str
    rejected: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def downgraded(self, why: str) -> "Choice":
        """The same component given back to the caller's request after ``why``."""
        rejected = dict(self.rejected)
        rejected[FA2] = why
        return dataclasses.replace(self, backend=self.requested, upgraded=False, reason=why, rejected=rejected)


@dataclasses.dataclass(frozen=True)
class Decision:
    choices: tuple[Choice, ...]
    composite: bool
    root_attn: object = None
    #: dtype name to inject, or None to keep the caller's (or transformers') dtype.
    inject_dtype: str | None = None
    dtype_note: str = ""

    @property
    def changed(self) -> bool:
        """True when the load differs from the caller's call at all."""
        return any(c.upgraded for c in self.choices)

    def attn_argument(self) -> object:
        """The ``attn_implementation`` to pass: a string for a plain model, a dict for a composite
        (every sub-config key whose value is set, plus ``""`` when the caller set the top level)."""
        if not self.composite:
            return self.choices[0].backend
        value = {c.component.key: c.backend for c in self.choices if c.backend is not None}
        if self.root_attn is not None:
            value[""] = self.root_attn
        return value

    def without_fa2(self, keys, why: str) -> "Decision":
        """Gives the components in ``keys`` back to the caller's request; drops the bf16 injection
        once no component is left on FlashAttention-2 (bf16 was only injected for it)."""
        choices = tuple(c.downgraded(why) if c.component.key in keys and c.upgraded else c for c in self.choices)
        inject = self.inject_dtype if any(c.upgraded for c in choices) else None
        note = self.dtype_note if inject else ""
        return dataclasses.replace(self, choices=choices, inject_dtype=inject, dtype_note=note)


def _fp32_blocker(request: Request, facts: TransformersFacts) -> str | None:
    dtype = request.dtype
    if dtype == "auto":
        dtype = request.checkpoint_dtype or "float32"
    if dtype is None or dtype in HALF_DTYPES:
        return None
    if dtype == "float32" and facts.fa2_autocasts_fp32:
        return None
    if dtype == "float32":
        return f"needs transformers >= 4.48 to run FlashAttention-2 on float32 weights under autocast, found {facts.version}"
    return f"needs bfloat16/float16 weights (or float32 under autocast), found dtype {dtype}"


def decide(
    request: Request,
    caps: Capabilities,
    components: tuple[Component, ...],
    placement: Placement,
    settings: Settings,
    facts: TransformersFacts,
) -> Decision:
    """Chooses the backend of every component and whether to inject bf16.

    Rules (README.md, "Policy"): only a request of None or ``"sdpa"`` may become FlashAttention-2
    (``"sdpa"`` not when ``keep_explicit_sdpa``); FlashAttention-2 needs a usable flash-attn, a
    CUDA GPU of compute capability >= 8.0 for every device the model lands on, no cpu/disk offload,
    a class that supports it, head_dim <= 256, no ``output_attentions``, and half-precision weights
    (or float32 where transformers runs FA2 under autocast).
    """
    env_blockers = caps.fa2_blockers()
    dtype_blocker = _fp32_blocker(request, facts)
    choices = []
    for comp in components:
        req = request.attn.get(comp.key)
        if req not in UPGRADABLE:
            choices.append(Choice(comp, req, req, False, f"caller chose {req!r}; left alone"))
            continue
        if req == "sdpa" and settings.keep_explicit_sdpa:
            choices.append(
                Choice(comp, req, req, False, "caller chose 'sdpa' and PANOVLM_FLASHPATCH_KEEP_SDPA keeps it")
            )
            continue
        blockers = list(env_blockers)
        if placement.offload:
            blockers.append(placement.offload)
        if not comp.supports_fa2:
            blockers.append(f"{comp.model_class} does not support FlashAttention-2")
        if comp.head_dim is not None and comp.head_dim > MAX_FA2_HEAD_DIM:
            blockers.append(f"needs head_dim <= {MAX_FA2_HEAD_DIM}, found {comp.head_dim}")
        if comp.output_attentions:
            blockers.append("output_attentions is requested, which FlashAttention-2 cannot return")
        if dtype_blocker:
            blockers.append(dtype_blocker)
        if comp.role in ENCODER_ROLES and not settings.encoders_fa2:
            blockers.append(ENCODER_REASON)
        if blockers:
            why = "; ".join(blockers)
            choices.append(Choice(comp, req, req, False, f"FlashAttention-2 not used: {why}", {FA2: why}))
        else:
            choices.append(Choice(comp, req, FA2, True, f"FlashAttention-2: {caps.summary()}"))

    inject, note = None, ""
    if any(c.upgraded for c in choices):
        if request.dtype is None:
            inject = "bfloat16" if caps.bf16 else "float16"
            note = f"{inject} injected: no dtype given"
        elif request.dtype == "float32" or (request.dtype == "auto" and (request.checkpoint_dtype or "float32") == "float32"):
            note = "float32 kept as given: FlashAttention-2 runs under torch.autocast (bf16/fp16) only"
        else:
            note = f"dtype {request.dtype} kept as given"
    return Decision(
        choices=tuple(choices),
        composite=bool(components) and components[0].key != "",
        root_attn=request.root_attn,
        inject_dtype=inject,
        dtype_note=note,
    )
