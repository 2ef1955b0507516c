"""``generate()`` on a static KV cache whose decode step transformers compiles (opt-in: ``fast_generate``).

Why: decoding a small model one token at a time is bound by the CPU launching kernels, not by the GPU.
transformers already has the cure: with ``cache_implementation="static"`` on a GPU it compiles the decode
step (CUDA graphs included) the first time it sees a new cache shape. Measured on an H200 (README "Fast
generation"), that decodes several times faster per token, after a compilation of tens of seconds; so it is
a switch, never the default, and the default only says once what the switch would buy.

What a call gets, when the switch is on and nothing in the call asks for something else:
``cache_implementation="static"`` with the cache length rounded up to a bucket (:func:`bucket`), so that an
evaluation loop of varying prompt lengths compiles once per bucket and batch size, not once per length.
transformers keeps its cache at the largest length it has seen, so a loop compiles at most once per bucket it
climbs to. How the length reaches transformers depends on its version (:func:`sizing`): its own
``max_cache_len`` option where it has one (5.17 and later); before that, a static cache we build with its
public constructor, keep per model, and reset before each call (what transformers does with its own).

Left exactly as transformers would run it (the reason is counted, logged once, and shown by ``report(model)``):
a cache, ``cache_implementation``, ``use_cache=False`` or ``disable_compile`` given by the caller or the
model's generation config; beam search; assisted generation; ``synced_gpus``; encoder-decoder models; a model
off the GPU; transformers before 4.48 (no compiled decode step). Nothing here changes the call's generation
config or the model's: the cache settings travel as arguments of that one call. If the static path raises,
the call is run again as the caller wrote it and the model keeps transformers' default from then on.
"""

from __future__ import annotations

import logging
import time
import weakref

import torch

from .. import reporting

#: Device types on which transformers compiles the decode step (tests add "cpu": there transformers runs the
#: static cache without compiling, which still exercises every other part of this path).
DEVICES = ("cuda",)
#: Cache lengths: powers of two from 256 to 4096, then multiples of 4096, each with a quarter of headroom, so
#: that the next, slightly longer prompt of a loop fits the cache already compiled (at most 2.5x an exact fit).
MIN_BUCKET = 256
LARGE_STEP = 4096
HEADROOM = 0.25
#: After this many generate() calls with the switch off, one INFO line says what the switch would do.
HINT_AFTER = 16
#: What the switch measured, for that line (benchmarks/results/fast_generate/; README "Fast generation").
MEASURED = ("measured by this project on an H200 with a Qwen3-0.6B-shaped model, 512-token prompts: 7.3x the tokens/s "
            "of the default at batch 1 and 6.8x at batch 8, after a one-off compilation of 37-49 s per batch size")

_OWN_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> the static cache we keep for it

#: The per-model tally of generate() calls: plain data on the model (copies keep it), but beside the plugin's state,
#: not in it. TorchDynamo guards on what the forward wrapper reads of that state when it compiles the decode step,
#: values nested in it included: a counter there that changes every call recompiles every call (measured: the
#: recompile limit after 8 calls, and transformers' decode step then runs uncompiled).
TALLY_ATTR = "_panovlm_flashpatch_generate"


def tally_of(model) -> dict | None:
    return getattr(model, "__dict__", {}).get(TALLY_ATTR)


def bucket(needed: int) -> int:
    """The cache length a call needing ``needed`` positions gets."""
    want = needed + int(needed * HEADROOM)
    if want <= LARGE_STEP:
        return max(MIN_BUCKET, 1 << max(want - 1, 0).bit_length())
    return -(-want // LARGE_STEP) * LARGE_STEP


def sizing() -> str | None:
    """How a bucketed cache length reaches transformers: ``"max_cache_len"`` (its own option), ``"own cache"``
    (a cache we pass), or None (this transformers does not compile generate()'s decode step)."""
    from transformers import GenerationConfig
    from transformers.modeling_utils import PreTrainedModel

    if not hasattr(PreTrainedModel, "get_compiled_call"):
        return None
    return "max_cache_len" if hasattr(GenerationConfig(), "max_cache_len") else "own cache"


def unavailable(model) -> str | None:
    """Why this model's generate() cannot take the fast path at all (None: it can)."""
    import transformers
    from transformers.modeling_utils import PreTrainedModel

    if sizing() is None:
        return f"transformers {transformers.__version__} does not compile generate()'s decode step (4.48 and later do)"
    cls = type(model)
    flag = "_supports_static_cache" if hasattr(PreTrainedModel, "_supports_static_cache") else "_can_compile_fullgraph"
    if not getattr(cls, flag, False):
        return f"{cls.__name__} does not support transformers' compiled static cache ({flag} is False)"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models keep transformers' default cache"
    return None


def _device_reason(model) -> str | None:
    device = getattr(model, "device", None)
    kind = getattr(device, "type", None)
    if kind not in DEVICES:
        return f"the model is on {kind or 'an unknown device'}: transformers compiles the decode step on CUDA GPUs only"
    return None


def _caller_choice(model, args, kwargs) -> str | None:
    """What in the call (or the generation config it uses) already decides the cache or the decoding."""
    config = kwargs.get("generation_config", args[1] if len(args) > 1 else None) or model.generation_config

    def given(name, default=None):
        return kwargs[name] if name in kwargs else getattr(config, name, default)

    for name in ("past_key_values", "cache"):
        if kwargs.get(name) is not None:
            return f"the call passes its own cache ({name})"
    if given("cache_implementation") is not None:
        return f"cache_implementation={given('cache_implementation')!r} is set by the call or the generation config"
    if given("use_cache") is False:
        return "use_cache=False"
    if given("disable_compile"):
        return "disable_compile=True"
    if (given("num_beams") or 1) > 1:
        return "beam search (num_beams > 1)"
    if kwargs.get("assistant_model") is not None or given("prompt_lookup_num_tokens") is not None:
        return "assisted generation"
    if kwargs.get("synced_gpus"):
        return "synced_gpus=True"
    return None


def _needed(model, args, kwargs) -> tuple[int, int]:
    """(batch size of the cache, positions it must hold): an upper bound from the call's inputs and limits."""
    config = kwargs.get("generation_config", args[1] if len(args) > 1 else None) or model.generation_config

    def given(name, default=None):
        value = kwargs[name] if name in kwargs else getattr(config, name, default)
        return default if value is None else value

    batch, length = 1, 0
    first = args[0] if args else kwargs.get("inputs")
    for tensor in (first, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2:
            batch, length = tensor.shape[0], max(length, tensor.shape[1])
    new = given("max_new_tokens")
    # max_length counts the prompt of input_ids but not of inputs_embeds: adding the prompt is the safe bound.
    extra = new if new is not None else given("max_length", 20)
    copies = max(given("num_return_sequences", 1), given("num_beams", 1))
    return batch * copies, length + extra + 1


def _own_cache(model, batch: int, length: int):
    """The static cache this model decodes on (transformers < 5.17): one per model, grown, never shrunk, reset."""
    import inspect

    from transformers import StaticCache

    cache = _OWN_CACHES.get(model)
    if cache is not None and cache.max_batch_size == batch and cache.max_cache_len >= length:
        cache.reset()
        return cache
    if cache is not None and cache.max_batch_size == batch:
        length = max(length, cache.max_cache_len)
    accepted = inspect.signature(StaticCache.__init__).parameters
    options = {"config": model.config.get_text_config(), "max_cache_len": length}
    for name, value in (("max_batch_size", batch), ("device", model.device), ("dtype", model.dtype)):
        if name in accepted:
            options[name] = value
    cache = StaticCache(**options)
    _OWN_CACHES[model] = cache
    return cache


class _FastCall:
    """One generate() call on the static cache; counts what it compiled."""

    def __init__(self, kwargs: dict, length: int):
        self.kwargs, self.length = kwargs, length

    def run(self, wrapped, args, tally: dict):
        graphs = _graphs()
        started = time.perf_counter()
        try:
            return wrapped(*args, **self.kwargs)
        finally:
            compiled = _graphs() - graphs
            tally["fast"] += 1
            tally["compilations"] += compiled
            if compiled:
                tally["compiling_s"] = round(tally["compiling_s"] + time.perf_counter() - started, 3)
            if self.length not in tally["lengths"]:
                tally["lengths"].append(self.length)


def _graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # a torch without the counter: the report then counts no compilation
        return 0


def prepare(model, tally: dict, args, kwargs, settings):
    """The fast call for this ``generate()``, or None to run it as the caller wrote it (the reason is counted)."""
    if not settings.fast_generate:
        tally["dynamic"] += 1
        if tally["dynamic"] == HINT_AFTER and not (unavailable(model) or _device_reason(model)):
            reporting.log_once("fast-generate-hint", reporting.info_level(), (
                f"{type(model).__name__} has run {HINT_AFTER} generate() calls on transformers' default cache. "
                f"apply(fast_generate=True) or PANOVLM_FLASHPATCH_FAST_GENERATE=1 decodes on a static cache with a "
                f"compiled step: {MEASURED} (README \"Fast generation\")."))
        return None
    reason = tally.get("broken") or unavailable(model) or _device_reason(model) or _caller_choice(model, args, kwargs)
    if reason is None:
        batch, needed = _needed(model, args, kwargs)
        if sizing() == "own cache":
            cache = _own_cache(model, batch, bucket(needed))
            extra, length = {"past_key_values": cache}, cache.max_cache_len
        else:
            # Never shorter than the longest so far: transformers does the same with its own cache, and a shorter
            # one would compile a new graph for a length already covered.
            length = max(bucket(needed), tally.get("largest", 0))
            extra = {"cache_implementation": "static", "max_cache_len": length}
        tally["largest"] = max(length, tally.get("largest", 0))
        return _FastCall({**kwargs, **extra}, length)
    tally["dynamic"] += 1
    left = tally["left"]
    left[reason] = left.get(reason, 0) + 1
    reporting.log_once(f"fast-generate: {reason}", reporting.info_level(),
                       f"fast_generate: {type(model).__name__}.generate() left to transformers' default cache: {reason}.")
    return None


def run(call: _FastCall, wrapped, model, tally: dict, args, kwargs):
    """Runs the fast call; if it raises, the call as the caller wrote it, and the model stays on the default."""
    try:
        return call.run(wrapped, args, tally)
    except Exception as exc:
        if kwargs.get("streamer") is not None:
            raise  # the streamer has already shown tokens: running again would show them twice
        failure = exc
    # As the caller wrote it: if this raises too, the error is the call's own, and it reaches the caller unchanged.
    result = wrapped(*args, **kwargs)
    reason = f"the static-cache call raised {type(failure).__name__}: {reporting.sentence(str(failure), 200)}"
    tally["broken"] = reason
    _OWN_CACHES.pop(model, None)
    reporting.emit(logging.WARNING, f"fast_generate: {type(model).__name__}.generate() {reason}; it ran again on "
                                    "transformers' default cache, which this model keeps from now on.")
    return result


def new_tally() -> dict:
    return {"dynamic": 0, "fast": 0, "compilations": 0, "compiling_s": 0.0, "lengths": [], "largest": 0, "left": {},
            "broken": None}


def status(model, tally: dict | None, settings) -> str | None:
    """One line for the report: None while the switch is off and no call took the fast path."""
    if tally is None or (not settings.fast_generate and not tally["fast"]):
        return None
    why = tally.get("broken") or unavailable(model)
    if why:
        return f"unavailable: {why}"
    head = "on" if settings.fast_generate else "off now"
    if not tally["fast"] and not tally["left"]:
        device = _device_reason(model)
        return (f"{head}: static cache, lengths rounded up to {MIN_BUCKET}, {2 * MIN_BUCKET}, ... {LARGE_STEP}, then "
                f"multiples of {LARGE_STEP}; decode step compiled by transformers" + (f" (not here: {device})" if device else ""))
    parts = [f"{tally['fast']} call(s) on a static cache, {tally['compilations']} compilation(s)"]
    if tally["lengths"]:
        parts.append("cache lengths " + ", ".join(str(n) for n in sorted(tally["lengths"])))
    if tally["compiling_s"]:
        parts.append(f"{tally['compiling_s']:.1f} s in calls that compiled")
    if tally["left"]:
        parts.append("left to the default cache: " + "; ".join(f"{n}x {r}" for r, n in tally["left"].items()))
    return f"{head}: " + ", ".join(parts)


def attach(model, load) -> dict:
    """runtime/__init__.py's protocol: every model that can generate keeps a tally; the switch is read per call."""
    from .. import state
    from . import Effect

    can = getattr(model, "can_generate", None)
    if not callable(can) or not can():
        return {}
    state.ensure(model)["generate"] = True  # set once: the generate() wrapper acts on this model
    tally = model.__dict__.setdefault(TALLY_ATTR, new_tally())
    if not load.settings.fast_generate:
        return {}
    line = status(model, tally, load.settings)
    keys = [c.component.key for c in load.decision.choices if c.component.role == "language model"] or [None]
    return {key: Effect(note=f"fast_generate {line}", fields={"fast_generate": line}) for key in keys}


def uninstall() -> None:
    _OWN_CACHES.clear()
