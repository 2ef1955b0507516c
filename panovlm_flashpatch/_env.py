"""Our environment variables: names, accepted values, and what each value means, in one table.

Standard library only: the start-up hook (``_bootstrap.py``) reads the same table at interpreter start,
where nothing else may be imported. Unset, empty and whitespace-only values all mean "not set" (the
default). A value we do not understand is never ignored silently: :func:`read` returns a problem that
names the variable, the value, the accepted values and what the plugin does instead, and the reading it
falls back to is chosen so that a typo never makes a run riskier than plain transformers.
"""

import os

DISABLE_FLASH_ATTN = "DISABLE_FLASH_ATTN"
KEEP_SDPA = "PANOVLM_FLASHPATCH_KEEP_SDPA"
AUTO = "PANOVLM_FLASHPATCH_AUTO"
GENERATE_FA2 = "PANOVLM_FLASHPATCH_GENERATE_FA2"
ENCODERS_FA2 = "PANOVLM_FLASHPATCH_ENCODERS_FA2"
PADDING_FREE = "PANOVLM_FLASHPATCH_PADDING_FREE"
FAST_GENERATE = "PANOVLM_FLASHPATCH_FAST_GENERATE"
SDPA_FLASH_FIRST = "PANOVLM_FLASHPATCH_SDPA_FLASH_FIRST"

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
#: PADDING_FREE's third value: pack, and leave ``logits`` out of a training output that has a loss.
LOSS_ONLY = "loss_only"
#: PADDING_FREE's default: pack the training forwards that run FlashAttention-2 (where packing measured faster).
AUTO_VALUE = "auto"

# name -> (default, reading of a value we do not understand, what each reading means). The unknown
# readings: a garbled DISABLE_FLASH_ATTN disables the plugin (the user was reaching for the off switch),
# a garbled KEEP_SDPA keeps the caller's "sdpa", a garbled AUTO leaves automatic activation off, garbled
# GENERATE_FA2 / ENCODERS_FA2 keep the measured-faster SDPA, a garbled PADDING_FREE leaves forwards padded, a
# garbled FAST_GENERATE leaves generate() as transformers runs it (no compilation the user did not ask for).
VARIABLES = {
    DISABLE_FLASH_ATTN: (False, True, {True: "the plugin is off: every load passes through untouched",
                                       False: "the plugin is on"}),
    KEEP_SDPA: (False, True, {True: "an explicit attn_implementation='sdpa' is kept",
                              False: "an explicit attn_implementation='sdpa' may be upgraded"}),
    AUTO: (True, False, {True: "automatic activation is on", False: "automatic activation is off"}),
    GENERATE_FA2: (False, False, {True: "generate() stays on FlashAttention-2", False: "generate() runs on SDPA"}),
    ENCODERS_FA2: (False, False, {True: "encoders may take FlashAttention-2", False: "encoders keep SDPA"}),
    PADDING_FREE: (AUTO_VALUE, False, {
        True: "padding-free packing is on (FlashAttention-2, and SDPA/eager on transformers >= 4.53)",
        LOSS_ONLY: "padding-free packing is on, outputs with a loss carry no logits, and the loss is computed in "
                   "chunks from the hidden states",
        AUTO_VALUE: "padded training forwards that run FlashAttention-2 are packed (verified model types)",
        False: "padding-free packing is off"}),
    FAST_GENERATE: (False, False, {True: "generate() decodes on a static cache with a compiled step",
                                   False: "generate() uses transformers' default cache"}),
    SDPA_FLASH_FIRST: (True, False, {True: "SDPA training forwards of a new shape try the flash kernel before cuDNN",
                                     False: "SDPA keeps torch's own kernel order"}),
}
NAMES = tuple(VARIABLES)


def _accepted(name: str) -> str:
    words = "1/true/yes/on or 0/false/no/off"
    return f"{AUTO_VALUE}, {LOSS_ONLY}, {words}" if name == PADDING_FREE else words


def read(name: str, environ=None):
    """One variable's reading: ``(value, problem)``; ``problem`` is None when the value was understood."""
    env = os.environ if environ is None else environ
    default, on_unknown, meaning = VARIABLES[name]
    raw = env.get(name)
    value = (raw or "").strip().lower()
    if not value:
        return default, None
    if value in TRUE:
        return True, None
    if value in FALSE:
        return False, None
    if name == PADDING_FREE and value.replace("-", "_") == LOSS_ONLY:
        return LOSS_ONLY, None
    if name == PADDING_FREE and value == AUTO_VALUE:
        return AUTO_VALUE, None
    problem = (f"{name}={raw!r} is not understood: accepted values are {_accepted(name)} "
               f"(unset or empty: {meaning[default]}). Until it is fixed, {meaning[on_unknown]}.")
    return on_unknown, problem


def describe(name: str, value) -> str:
    """What a reading of ``name`` means, in words ("automatic activation is off")."""
    return VARIABLES[name][2][value]
