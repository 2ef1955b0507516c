"""The backend table: every attention backend the plugin knows, what each needs, and which one each phase runs.

One record per backend (what it needs, the reason it is rejected), and per phase an order of preference
backed by a measurement, in the manner of vLLM's backend selector: the first backend of a phase's order
that can run is the one the phase gets, and every backend before it carries a one-line reason. The
runtime features (runtime/) carry these choices out; this module only says what they are and why, for
``report()``, the log line and the doctor. It imports neither torch nor transformers.

Phases (what a forward is doing decides the backend, not only what the model loaded with):

* ``padded training``: a training forward of a padded batch (dynamic padding, as Trainer's collators make); packed
  into one row on FlashAttention-2, or without flash-attn on torch's varlen kernel (runtime/varlen.py);
* ``unpadded training``: a training forward with nothing to unpad (batch 1, or rows the caller packed);
* ``decoding``: the forwards of ``generate()``;
* ``encoder``: the forwards of a vision/text/audio encoder tower;
* ``float32 outside autocast``: float32 weights with no autocast, which FlashAttention kernels cannot take.

Measured on one H200 (sm_90; torch 2.11, cuDNN 9.19, transformers 5.17, flash-attn 2.8.3), Qwen3-0.6B-shaped,
benchmarks/results/workloads. Where nothing was measured (Ampere, consumer GPUs), the same order is kept and
the report says that it is not measured there; on those GPUs torch's own SDPA order is already flash first.
"""

from __future__ import annotations

import dataclasses

FA2 = "flash_attention_2"
FA3 = "flash_attention_3"
FA4 = "flash_attention_4"
SDPA = "sdpa"
EAGER = "eager"
#: SDPA with torch's flash kernel tried before cuDNN's for a forward of a new shape (runtime/sdpa_order.py).
SDPA_FLASH_FIRST = "sdpa (flash kernel first)"
#: A packed SDPA forward whose attention runs torch's own variable-length flash kernel (runtime/varlen.py).
SDPA_VARLEN = "sdpa + packing (torch varlen kernel)"

PADDED = "padded training"
UNPADDED = "unpadded training"
DECODING = "decoding"
ENCODER = "encoder"
FP32 = "float32 outside autocast"
PHASES = (PADDED, UNPADDED, DECODING, ENCODER, FP32)

#: The GPU generation the orders below were measured on.
MEASURED_ON = (9, 0)


@dataclasses.dataclass(frozen=True)
class Rung:
    """One backend: the ``attn_implementation`` transformers is given, and what it needs."""

    name: str
    attn_implementation: str
    package: str | None  # the distribution that provides it (None: torch itself)
    min_capability: tuple[int, int] | None
    half_only: bool  # refuses float32 inputs
    automatic: bool  # the plugin may choose it without the caller asking (only once measured faster)

    def needs(self) -> str:
        """``"flash-attn, a CUDA GPU of sm >= 8.0, float16/bfloat16"`` (the doctor's wording)."""
        parts = [self.package or "torch"]
        if self.min_capability:
            parts.append(f"a CUDA GPU of sm >= {self.min_capability[0]}.{self.min_capability[1]}")
        if self.half_only:
            parts.append("float16/bfloat16")
        return ", ".join(parts)


RUNGS = {
    FA4: Rung(FA4, FA4, "flash-attn-4", (9, 0), True, False),
    FA3: Rung(FA3, FA3, "flash-attn-3", (9, 0), True, False),  # Hopper kernels
    FA2: Rung(FA2, FA2, "flash-attn", (8, 0), True, True),
    SDPA_VARLEN: Rung(SDPA_VARLEN, SDPA, "torch >= 2.10", (8, 0), True, True),
    SDPA_FLASH_FIRST: Rung(SDPA_FLASH_FIRST, SDPA, None, (8, 0), False, True),
    SDPA: Rung(SDPA, SDPA, None, None, False, True),
    EAGER: Rung(EAGER, EAGER, None, None, False, True),
}

#: Per phase, the measurement behind its order of preference (the order itself: :func:`_candidates`).
EVIDENCE = {
    PADDED: ("FlashAttention-2 with the batch packed into one row measured fastest for dynamic padding "
             "(batch 8 and 16, lengths 128-1024: about 1.9x plain transformers in the warm-up, 1.4x in the steady state); "
             "without flash-attn, the packed row on torch's varlen kernel (batch 8: 1.9x plain in the warm-up, 1.26x in "
             "the steady state, 1.5x over 300 steps), then SDPA with its flash kernel first unpacked (1.3x: cuDNN builds "
             "a plan for every new shape)"),
    UNPADDED: ("batch 1, lengths 1200-1600, H200: SDPA with its flash kernel first 15.1k real tokens/s, FlashAttention-2 "
               "12.6k, plain transformers (cuDNN first, a plan per new length) 8.0k"),
    DECODING: "SDPA measured faster than FlashAttention-2 for decoding (transformers' FA2 path syncs in every layer)",
    ENCODER: "SDPA measured faster than FlashAttention-2 for encoder towers (SigLIP-base 0.90x with FA2; a "
             "SigLIP2-so400m shape 0.22 vs 0.54 ms)",
    FP32: "FlashAttention kernels take float16/bfloat16 only",
}


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the phase choice of one component depends on, as plain values (gathered by runtime/__init__.py)."""

    role: str
    loaded: str  # the backend the component loaded with (after the plugin's decision)
    fa2_blockers: tuple[str, ...] = ()  # why FlashAttention-2 was not chosen at load (empty: it was)
    fallback: str = SDPA  # the backend a forward that cannot run FA2 gets
    packing: str | None = None  # padded training forwards run packed: on which backends ("fa2", "all"), None: not
    packing_reason: str = ""
    unpadded_row: bool = False  # batch-1 training forwards of this FA2 component run SDPA, flash first
    flash_first: bool = False  # SDPA forwards of new shapes try the flash kernel before cuDNN
    flash_first_reason: str = ""
    varlen_reason: str | None = "padding-free is off"  # why packed SDPA forwards cannot run torch's varlen kernel
    generate_fa2: bool = False
    caller_choice: str | None = None  # the caller's own backend, left alone (the reason, worded)
    capability: tuple[int, int] | None = None
    fa3_error: str | None = "not installed"
    fa4_error: str | None = "not installed"


def _optional_reason(name: str, facts: Facts) -> str:
    """FlashAttention-3/4 are detected and reported; chosen only once a GPU run shows them faster."""
    error = facts.fa4_error if name == FA4 else facts.fa3_error
    return error or (f"installed, not chosen automatically: no GPU run has shown it faster than FlashAttention-2 "
                     f"here (attn_implementation={name!r} to use it)")


def _fa2_reason(facts: Facts) -> str | None:
    if facts.loaded == FA2:
        return None
    return "; ".join(facts.fa2_blockers) or f"the component loaded with {facts.loaded}"


def _candidates(phase: str, facts: Facts):
    """(backend as the phase runs it, reason it is not taken or None), in the phase's order of preference."""
    on_fa2 = facts.loaded == FA2
    sdpa_reachable = SDPA in (facts.loaded, facts.fallback)
    sdpa_why = None if sdpa_reachable else f"the component runs {facts.loaded}, not SDPA"
    flash_first_why = sdpa_why or (None if facts.flash_first else (facts.flash_first_reason or "not armed"))
    if phase in (PADDED, UNPADDED):
        yield FA4, _optional_reason(FA4, facts)
        yield FA3, _optional_reason(FA3, facts)
        if phase == PADDED:
            packed = facts.packing in ("fa2", "all")
            yield (f"{FA2} + packing" if packed else FA2), _fa2_reason(facts)
            yield SDPA_VARLEN, sdpa_why or facts.varlen_reason or (
                None if facts.packing else (facts.packing_reason or "padding-free is not armed"))
            both = facts.packing == "all"
            yield (f"{SDPA_FLASH_FIRST} + packing" if both else SDPA_FLASH_FIRST), flash_first_why
            yield (f"{SDPA} + packing" if both else SDPA), sdpa_why
        else:
            if facts.unpadded_row:
                # Measured: one unpadded row runs faster on SDPA with the flash kernel first than on flash-attn.
                yield f"{SDPA_FLASH_FIRST} at batch 1 (rows you packed, several rows: {FA2})", flash_first_why
                yield FA2, "SDPA with its flash kernel first measured faster for one unpadded row (batch 1)"
            else:
                yield FA2, _fa2_reason(facts)
                yield SDPA_FLASH_FIRST, flash_first_why
            yield SDPA, sdpa_why
    elif phase == DECODING:
        if not on_fa2:
            yield FA2, _fa2_reason(facts)
        elif not facts.generate_fa2:
            yield FA2, "SDPA measured faster for decoding (generate_fa2=True keeps FlashAttention-2)"
        else:
            yield FA2, None
        yield SDPA, sdpa_why
    elif phase == ENCODER:
        yield FA2, _fa2_reason(facts)  # on FA2 only where the caller asked (encoders_fa2)
        yield (SDPA_FLASH_FIRST if facts.flash_first else SDPA), sdpa_why
    elif phase == FP32:
        yield FA2, EVIDENCE[FP32] if on_fa2 else _fa2_reason(facts)
        yield SDPA, sdpa_why
    yield EAGER, None if EAGER in (facts.loaded, facts.fallback) else "slower than SDPA; only where SDPA cannot run"


#: Phases whose measured best is SDPA whatever else can run (FlashAttention-2 there only when the caller asks).
_PREFERRED = {DECODING: SDPA, ENCODER: SDPA, FP32: SDPA}


def choose(phase: str, facts: Facts) -> dict:
    """``{"backend": ..., "why": ..., "rejected": {backend: reason}}`` for one phase of one component.

    ``why`` gives the measurement when the phase runs its preferred backend, and otherwise says which faster ones
    cannot run here (their reasons are in ``rejected``)."""
    rejected = {}
    preferred = _PREFERRED.get(phase)
    if phase == ENCODER and facts.flash_first:
        preferred = SDPA_FLASH_FIRST
    for name, why in _candidates(phase, facts):
        if preferred is None and name not in (FA3, FA4):
            preferred = name
        if why is not None:
            rejected.setdefault(name, why)
            continue
        note = EVIDENCE[phase]
        if facts.caller_choice and name in (facts.loaded, f"{facts.loaded} + packing"):
            note = facts.caller_choice
        elif name != preferred and not (phase in _PREFERRED and facts.loaded == FA2 and name == FA2):
            faster = [n for n in rejected if n not in (FA3, FA4)]
            note = f"the fastest that runs here: {', '.join(faster)} cannot (see rejected)"
        elif phase == DECODING and facts.generate_fa2 and name == FA2:
            note = "generate_fa2 is on: generate() stays on FlashAttention-2"
        elif phase == ENCODER and name == FA2:
            note = "encoders_fa2 is on: the encoder runs FlashAttention-2"
        elif phase == PADDED and name == FA2 and facts.packing_reason:
            note = f"{note}; this model stays padded: {facts.packing_reason}"
        elif phase == UNPADDED and name == FA2 and facts.loaded == FA2 and facts.flash_first:
            note = f"{note}; batch 1 stays on FlashAttention-2 here: the SDPA switch for it is measured on sm_90 only"
        if facts.capability is not None and facts.capability[0] != MEASURED_ON[0] and phase in (PADDED, UNPADDED):
            note += (f" (measured on sm_{MEASURED_ON[0]}{MEASURED_ON[1]}, not on this GPU's "
                     f"sm_{facts.capability[0]}{facts.capability[1]})")
        return {"backend": name, "why": note, "rejected": rejected}
    return {"backend": facts.loaded, "why": "as loaded", "rejected": rejected}


def phases_for(facts: Facts) -> dict[str, dict]:
    """Every phase that applies to the component's role: phase -> :func:`choose`'s answer."""
    encoder = facts.role in ("vision encoder", "text encoder", "audio encoder")
    wanted = (ENCODER, FP32) if encoder else (PADDED, UNPADDED, DECODING, FP32)
    return {phase: choose(phase, facts) for phase in wanted}


def summary(by_phase: dict[str, dict]) -> str:
    """One phrase for the log line: ``padded training: flash_attention_2 + packing; decoding: sdpa; ...``."""
    return "; ".join(f"{phase}: {choice['backend']}" for phase, choice in by_phase.items())
