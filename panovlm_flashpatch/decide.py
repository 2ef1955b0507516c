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
ENCODER_RULE = "encoders keep SDPA: FlashAttention-2 measured slower for a SigLIP-base tower (0.90x on an H100, benchmarks/results)"
ENCODER_SWITCH = "PANOVLM_FLASHPATCH_ENCODERS_FA2=1 or apply(encoders_fa2=True) to use it"
#: Dtype names that FlashAttention-2 runs in directly; float32 runs it under autocast, other forwards fall back.
HALF_DTYPES = ("bfloat16", "float16")
RUNNABLE_DTYPES = HALF_DTYPES + ("float32",)
PLUGIN_CONFIG = "the config of an earlier plugin load"


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
        checkpoint_dtype: the dtype recorded in the checkpoint (its config, else its weights).
        load_dtype: the dtype transformers alone would load this call in (``dtype``, with ``"auto"``
            and "not given" resolved the way this transformers version resolves them).
        requested_from: per component key, where ``attn`` was read when not from the caller's own
            arguments (a config that came out of an earlier plugin load carries the plugin's choice).
    """

    attn: Mapping[str, object]
    root_attn: object = None
    dtype: str | None = None
    checkpoint_dtype: str | None = None
    load_dtype: str | None = None
    requested_from: Mapping[str, str] = dataclasses.field(default_factory=dict)


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
        fallback: what to ask for when not upgraded: the caller's request, or, when the request was read
            from a config that carries an earlier plugin load's choice, the backend the caller would have had.
    """

    component: Component
    requested: object
    backend: object
    upgraded: bool
    reason: str
    rejected: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fallback: object = None

    def downgraded(self, why: str) -> "Choice":
        """The same component given back to the caller's request after ``why``."""
        rejected = dict(self.rejected)
        rejected[FA2] = why
        return dataclasses.replace(self, backend=self.fallback, upgraded=False, reason=why, rejected=rejected)


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
        """True while some component is upgraded (the retry loop gives them back one refusal at a time)."""
        return any(c.upgraded for c in self.choices)

    @property
    def overrides_config(self) -> bool:
        """A config carried an earlier plugin load's choice: even the caller's call must name the backend."""
        return any(c.fallback != c.requested for c in self.choices)

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


def _attention_blocker(comp: Component) -> str | None:
    """FlashAttention-2 is chosen only where the plugin can give a forward it cannot run back (runtime/dispatch.py)."""
    code = comp.attention
    if code.switchable:
        return None
    if code.kind == "own":
        return (f"{comp.model_class} computes attention in its own code ({code.module}), which calls neither flash-attn "
                "nor transformers' attention functions: FlashAttention-2 would not run")
    if code.kind == "fixed":
        return (f"{comp.model_class} cannot change its attention backend per forward ({code.module} builds its layers or "
                "masks for one backend), so a forward FlashAttention-2 cannot run (float32 outside autocast, off the GPU) "
                "could not fall back")
    return (f"the plugin cannot read {comp.model_class}'s attention code{f' ({code.module})' if code.module else ''}, "
            "so it cannot tell that FlashAttention-2 would run, nor fall back per forward")


def _dtype_blocker(load_dtype: str | None) -> str | None:
    if load_dtype is None or load_dtype in RUNNABLE_DTYPES or load_dtype == "per-component":
        return None
    return f"needs bfloat16/float16 weights (or float32 under autocast), found dtype {load_dtype}"


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
    a class that supports it, head_dim <= 256, no ``output_attentions``, attention code whose backend
    can switch per forward (so that a forward FA2 cannot run falls back), and not an encoder (unless
    ``encoders_fa2``). bf16 is injected only where the caller gave no dtype and transformers would load
    float32.
    """
    env_blockers = caps.fa2_blockers()
    dtype_blocker = _dtype_blocker(request.load_dtype)
    choices = []
    for comp in components:
        req = request.attn.get(comp.key)
        origin = request.requested_from.get(comp.key, "caller")
        carried = "" if origin == "caller" else (f" (read from {origin}: its backend was the plugin's choice, "
                                                 f"the caller had asked for {req!r})")
        # Not upgraded, a carried request goes back to what the caller would have had, named explicitly.
        keep = comp.default_backend if (carried and req is None) else req
        if req not in UPGRADABLE:
            choices.append(Choice(comp, req, req, False, f"caller chose {req!r}; left alone{carried}", fallback=keep))
            continue
        if req == "sdpa" and settings.keep_explicit_sdpa:
            choices.append(Choice(comp, req, req, False,
                                  f"caller chose 'sdpa' and {settings.source('keep_explicit_sdpa')} keeps it{carried}",
                                  fallback=keep))
            continue
        blockers = list(env_blockers)
        if placement.offload:
            blockers.append(placement.offload)
        if comp.refusal:
            blockers.append(comp.refusal)
        elif not comp.supports_fa2:
            blockers.append(f"{comp.model_class} does not support FlashAttention-2")
        else:
            attention = _attention_blocker(comp)
            if attention:
                blockers.append(attention)
        if comp.head_dim is not None and comp.head_dim > MAX_FA2_HEAD_DIM:
            blockers.append(f"needs head_dim <= {MAX_FA2_HEAD_DIM}, found {comp.head_dim}")
        if comp.output_attentions:
            blockers.append("output_attentions is requested, which FlashAttention-2 cannot return")
        if dtype_blocker:
            blockers.append(dtype_blocker)
        if comp.role in ENCODER_ROLES and not settings.encoders_fa2:
            # The switch is named only where it would make a difference.
            blockers.append(ENCODER_RULE if blockers else f"{ENCODER_RULE}; {ENCODER_SWITCH}")
        if blockers:
            why = "; ".join(blockers)
            choices.append(Choice(comp, req, keep, False, f"FlashAttention-2 not used: {why}{carried}", {FA2: why},
                                  fallback=keep))
        else:
            choices.append(Choice(comp, req, FA2, True, f"FlashAttention-2: {caps.summary()}{carried}", fallback=keep))

    inject, note = None, ""
    if any(c.upgraded for c in choices):
        load_dtype = request.load_dtype
        if request.dtype is None and load_dtype == "float32":
            inject = "bfloat16" if caps.bf16 else "float16"
            note = f"{inject} injected: no dtype given, and transformers would load float32"
        elif load_dtype == "float32":
            note = "float32 as given: FlashAttention-2 runs under torch.autocast (bf16/fp16)"
        elif request.dtype is None and load_dtype:
            note = f"{load_dtype}, the checkpoint's dtype, as transformers loads it"
        elif load_dtype:
            note = f"dtype {load_dtype} kept as given"
    return Decision(
        choices=tuple(choices),
        composite=bool(components) and components[0].key != "",
        root_attn=request.root_attn,
        inject_dtype=inject,
        dtype_note=note,
    )
