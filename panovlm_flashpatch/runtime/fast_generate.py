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
``max_cache_len`` option where it has one (5.17 and later); before that, a static cache built for the call
with transformers' public constructor (never shared between calls).

Left exactly as transformers would run it (the reason is counted, logged once, and shown by ``report(model)``):
a cache, ``cache_implementation``, ``use_cache=False`` or ``disable_compile`` given by the caller or a
generation config (the passed one or the model's, read as transformers reads them); beam search, assisted
generation and other decoding methods than greedy and sampling; ``synced_gpus``; a streamer (a failure could
not be re-run unseen); ``return_dict_in_generate`` and ``output_attentions`` (a static cache would show in
what the call returns); a call that may need more positions than the model has; a call made from inside
another ``generate()`` (an assistant's); encoder-decoder models; a model off the GPU; transformers before 4.48
(no compiled decode step). Nothing here changes a generation config: the cache settings travel as arguments
of that one call (or in a copy of the config it passed). If the static path raises, the call is run again as
the caller wrote it and the model keeps transformers' default from then on.
"""

from __future__ import annotations

import functools
import logging
import time

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


@functools.lru_cache(maxsize=None)  # a property of the installed transformers: read once, not per call
def sizing() -> str | None:
    """How a bucketed cache length reaches transformers: ``"max_cache_len"`` (its own option), ``"own cache"``
    (a cache built for each call and passed in), or None (this transformers does not compile generate()'s decode step)."""
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


class _Call:
    """One generate() call as transformers will read it: the call's arguments over the generation config it
    passes, over the model's generation config (transformers fills a passed config's default values from the
    model's), over the library defaults."""

    def __init__(self, model, args, kwargs):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.passed = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        self.defaults = _defaults()

    def get(self, name, default=None):
        if name in self.kwargs:
            value = self.kwargs[name]
        else:
            value = getattr(self.defaults, name, None)
            passed = getattr(self.passed, name, value) if self.passed is not None else value
            if passed != value:
                value = passed
            else:
                value = getattr(self.model.generation_config, name, value)
        return default if value is None else value


@functools.lru_cache(maxsize=None)
def _defaults():
    """transformers' default generation settings (built once: a GenerationConfig per call costs for nothing)."""
    from transformers import GenerationConfig

    return GenerationConfig()


def _caller_choice(call: _Call) -> str | None:
    """What in the call (or the generation config it uses) already decides the cache or the decoding, or what a
    static cache would change in what the call returns."""
    kwargs = call.kwargs
    for name in ("past_key_values", "cache"):
        if kwargs.get(name) is not None:
            return f"the call passes its own cache ({name})"
    if call.get("cache_implementation") is not None:
        return f"cache_implementation={call.get('cache_implementation')!r} is set by the call or a generation config"
    if call.get("use_cache") is False:
        return "use_cache=False"
    if call.get("disable_compile"):
        return "disable_compile=True"
    if call.get("num_beams", 1) > 1:
        return "beam search (num_beams > 1)"
    if (kwargs.get("assistant_model") is not None or call.get("prompt_lookup_num_tokens") is not None
            or call.get("assistant_early_exit") is not None):
        return "assisted generation"
    if call.get("penalty_alpha") is not None or call.get("dola_layers") is not None or kwargs.get("custom_generate"):
        return "a decoding method other than greedy or sampling"
    if kwargs.get("synced_gpus"):
        return "synced_gpus=True"
    if kwargs.get("streamer") is not None:
        # A static-cache failure could not be run again without showing the streamed tokens twice.
        return "a streamer is given"
    if call.get("return_dict_in_generate"):
        return "return_dict_in_generate=True (its past_key_values would be a static cache, which a later call cannot grow)"
    if call.get("output_attentions"):
        return "output_attentions=True (a static cache returns attention over its whole length)"
    return None


def _needed(call: _Call) -> tuple[int, int]:
    """(batch size of the cache, positions it must hold): an upper bound from the call's inputs and limits."""
    batch, length = 1, 0
    first = call.args[0] if call.args else call.kwargs.get("inputs")
    for tensor in (first, call.kwargs.get("input_ids"), call.kwargs.get("inputs_embeds")):
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2:
            batch, length = tensor.shape[0], max(length, tensor.shape[1])
    new = call.get("max_new_tokens")
    # max_length counts the prompt of input_ids but not of inputs_embeds: adding the prompt is the safe bound.
    extra = new if new is not None else call.get("max_length", 20)
    copies = max(call.get("num_return_sequences", 1), call.get("num_beams", 1))
    return batch * copies, length + extra + 1


def _position_limit(model) -> int | None:
    try:
        return int(getattr(model.config.get_text_config(), "max_position_embeddings", None) or 0) or None
    except Exception:  # a config without a text config: no limit known
        return None


def _fresh_cache(model, batch: int, length: int):
    """A static cache for one call (transformers 4.48-5.16, which have no max_cache_len option): built with
    transformers' public constructor as its own generate() would build it, never shared between calls, so that
    concurrent calls, a caller keeping the returned cache, or a model moved to another dtype cannot meet a
    stale one. TorchDynamo guards on the cache's shape, not on the object: a new cache of a compiled shape
    reuses the compiled step (transformers 5.17+ builds a new one per call too)."""
    import inspect

    from transformers import StaticCache

    accepted = inspect.signature(StaticCache.__init__).parameters
    options = {"config": model.config.get_text_config(), "max_cache_len": length}
    for name, value in (("max_batch_size", batch), ("device", model.device), ("dtype", model.dtype)):
        if name in accepted:
            options[name] = value
    return StaticCache(**options)


class _FastCall:
    """One generate() call on the static cache; counts what it compiled."""

    def __init__(self, args: tuple, kwargs: dict, length: int):
        self.args, self.kwargs, self.length = args, kwargs, length

    def run(self, wrapped, tally: dict):
        graphs = _graphs()
        started = time.perf_counter()
        try:
            return wrapped(*self.args, **self.kwargs)
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
    call = _Call(model, args, kwargs)
    reason = tally.get("broken") or unavailable(model) or _device_reason(model) or _caller_choice(call)
    if reason is None:
        batch, needed = _needed(call)
        limit = _position_limit(model)
        if limit is not None and needed > limit:
            reason = (f"the call may need {needed} positions, more than the model's {limit} (max_position_embeddings): "
                      "no static cache that large is allocated")
    if reason is not None:
        tally["dynamic"] += 1
        left = tally["left"]
        left[reason] = left.get(reason, 0) + 1
        reporting.log_once(f"fast-generate: {reason}", reporting.info_level(),
                           f"fast_generate: {type(model).__name__}.generate() left to transformers' default cache: {reason}.")
        return None
    length = bucket(needed)
    if limit is not None:
        length = min(length, limit)
    if sizing() == "own cache":
        return _FastCall(args, {**kwargs, "past_key_values": _fresh_cache(model, batch, length)}, length)
    # Never shorter than the longest so far: transformers does the same with its own cache, and a shorter one would
    # compile a new graph for a length already covered.
    length = max(length, tally.get("largest", 0))
    tally["largest"] = length
    if call.passed is None:
        return _FastCall(args, {**kwargs, "cache_implementation": "static", "max_cache_len": length}, length)
    # A generation config was passed: the cache settings go into a copy of it (transformers warns about a config
    # passed together with generation arguments); the caller's object is not touched.
    import copy

    config = copy.deepcopy(call.passed)
    config.cache_implementation, config.max_cache_len = "static", length
    if "generation_config" in kwargs:
        return _FastCall(args, {**kwargs, "generation_config": config}, length)
    return _FastCall((args[0], config) + tuple(args[2:]), kwargs, length)


def run(call: _FastCall, wrapped, model, tally: dict, args, kwargs):
    """Runs the fast call; if it raises, the call as the caller wrote it, and the model stays on the default."""
    try:
        return call.run(wrapped, tally)
    except Exception as exc:  # calls with a streamer never come here (_caller_choice)
        failure = exc
    # As the caller wrote it: if this raises too, the error is the call's own, and it reaches the caller unchanged.
    result = wrapped(*args, **kwargs)
    reason = f"the static-cache call raised {type(failure).__name__}: {reporting.sentence(str(failure), 200)}"
    tally["broken"] = reason
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
    """Nothing to put back: the generate() wrapper (generate.py) is what acts, and no cache is kept."""
