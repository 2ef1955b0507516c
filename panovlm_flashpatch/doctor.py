"""``python -m panovlm_flashpatch`` / ``panovlm-flashpatch``: one screen on what this environment can run.

In the spirit of ``python -m xformers.info``: data first (:func:`collect` returns flat dotted keys),
display second (text or ``--json``). With ``--model PATH`` (a local checkpoint folder; nothing is
ever downloaded) it reads only the config and says which backend and dtype each component would
get, and why, without loading any weights.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import site
import sys

from . import __version__
from . import reporting
from . import settings as settings_module

PTH_NAME = "panovlm_flashpatch.pth"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _activation_file() -> str | None:
    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    user = getattr(site, "getusersitepackages", lambda: None)()
    dirs += [user] if user else []
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    for folder in dict.fromkeys(dirs):
        candidate = os.path.join(folder, PTH_NAME)
        if os.path.isfile(candidate):
            return candidate
    return None


def collect(model_path: str | None = None, attn_implementation: str | None = None, dtype: str | None = None,
            trust_remote_code: bool = False) -> dict:
    """Everything the doctor knows, as flat ``section.key`` entries (JSON-serialisable)."""
    import torch

    from . import probe as probe_module
    from .compat import transformers_facts
    from .patch import is_applied

    info: dict = {
        "panovlm_flashpatch.version": __version__,
        "python.version": platform.python_version(),
        "python.executable": sys.executable,
        "torch.version": torch.__version__,
        "torch.cuda_build": torch.version.cuda,
        "transformers.version": _version("transformers"),
        "wrapt.version": _version("wrapt"),
    }
    facts = transformers_facts()
    info["transformers.supported"] = facts.supported
    caps = probe_module.probe()
    info["flash_attn.version"] = caps.flash_attn_version
    info["flash_attn.status"] = caps.flash_attn_error or "ok: CUDA extension imports"
    info["kernels.version"] = caps.kernels_version
    info["cuda.available"] = caps.cuda_available
    count = torch.cuda.device_count() if caps.cuda_available else 0
    info["cuda.device_count"] = count
    for index in range(count):
        dev = probe_module._device_info(index)
        info[f"gpu.{index}.name"] = dev.name
        info[f"gpu.{index}.compute_capability"] = f"{dev.compute_capability[0]}.{dev.compute_capability[1]}"
        info[f"gpu.{index}.bf16"] = dev.bf16
    blockers = caps.fa2_blockers()
    info["flash_attention_2.usable"] = not blockers
    info["flash_attention_2.reasons"] = list(blockers)
    current = settings_module.current()
    for name, why in _backends(caps, current).items():
        info[f"backend.{_KEYS.get(name, name)}"] = why
    info["fast_generate.enabled"] = current.fast_generate
    info["fast_generate.support"] = _fast_generate_support(facts)
    pth = _activation_file()
    info["activation.installed"] = pth is not None
    info["activation.file"] = pth
    info["activation.enabled"] = bool(pth) and current.auto and not current.disabled
    info["activation.applied_in_this_process"] = is_applied()
    for name, raw in settings_module.known_variables().items():
        info[f"env.{name}"] = raw
    info["env.problems"] = list(current.problems)
    if model_path is not None:
        info.update(dry_run(model_path, attn_implementation, dtype, trust_remote_code, caps, current, facts))
    return info


#: The doctor's key for the backends whose names are phrases.
_KEYS = {"sdpa (flash kernel first)": "sdpa_flash_first", "sdpa + packing (torch varlen kernel)": "sdpa_varlen"}


def _backends(caps, current) -> dict[str, str]:
    """Every backend of the table (backends.py): usable here, or why not."""
    from . import backends
    from .runtime import sdpa_order, varlen

    blockers = caps.fa2_blockers()
    flash_first, why_not = sdpa_order.status(caps, current)
    no_varlen = varlen.machine_reason(caps)
    if not current.padding_free:
        no_varlen = f"off: padding-free is off ({current.source('padding_free')})"
    state = {
        backends.FA4: caps.fa4_error or f"flash-attn-4 {caps.fa4_version}: usable, chosen only when asked for",
        backends.FA3: caps.fa3_error or f"flash-attn-3 {caps.fa3_version}: usable, chosen only when asked for",
        backends.FA2: "not usable: " + "; ".join(blockers) if blockers else f"usable: {caps.summary()}",
        backends.SDPA_VARLEN: no_varlen or ("usable: packed training forwards on SDPA run their attention on torch's "
                                            "varlen kernel (where flash-attn is not used)"),
        backends.SDPA_FLASH_FIRST: why_not if flash_first else f"off: {why_not}",
        backends.SDPA: "usable (torch's own kernel order)",
        backends.EAGER: "usable",
    }
    return {name: f"{state[name]} (needs {rung.needs()})" for name, rung in backends.RUNGS.items()}


def _fast_generate_support(facts) -> str:
    """How fast_generate sizes its static cache on this transformers, or why it cannot run here."""
    if not facts.supported:
        return f"unavailable: transformers {facts.version} is not supported"
    from .runtime import fast_generate

    how = fast_generate.sizing()
    if how is None:
        return f"unavailable: transformers {facts.version} does not compile generate()'s decode step (4.48 and later do)"
    return {"max_cache_len": "yes: transformers' max_cache_len sizes the static cache",
            "own cache": "yes: a static cache built for each call sizes the cache"}[how] + " (GPU models only)"


class NotACheckpoint(Exception):
    pass


class BadArgument(NotACheckpoint):
    pass


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                  "fp64": "float64", "double": "float64"}


def dtype_argument(text: str):
    """``--dtype`` as from_pretrained takes it: "auto", or a floating-point torch dtype ("bf16", "torch.bfloat16" too)."""
    import torch

    name = _DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower().removeprefix("torch."))
    if name == "auto":
        return "auto"
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise BadArgument(f"--dtype {text!r} is not a floating-point dtype: use auto, bfloat16 (bf16), float16 (fp16) "
                          "or float32 (fp32)")
    return value


def dry_run(path, attn_implementation, dtype, trust_remote_code, caps, current, facts) -> dict:
    """Which backend and dtype each component of ``path`` would get, from its config alone.

    The same planner as a real load (plan.py), with the probe's answer for this machine; nothing but the
    config is read, and nothing is downloaded.
    """
    import transformers
    from transformers import AutoConfig

    from .plan import CannotPlan, plan_call

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise NotACheckpoint(f"{path!r} is not a checkpoint folder: it has no config.json (the doctor never downloads)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise NotACheckpoint(f"{path!r}: its config.json cannot be read ({type(exc).__name__}: {reporting.sentence(exc)})") from None
    names = list(getattr(config, "architectures", None) or [])
    model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if model_class is None:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        try:
            model_class = MODEL_MAPPING[type(config)]
        except KeyError:
            raise NotACheckpoint(
                f"{path!r}: no transformers class for architectures {names or '?'} (remote code is not imported by the doctor)"
            ) from None
    out = {"model.path": path, "model.class": model_class.__name__}
    if current.disabled:
        out["model.backend"] = "as transformers loads it"
        out["model.reason"] = f"{current.source('disabled')}: the plugin is off, every load passes through untouched"
        return out
    kwargs = {"config": config}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs[facts.dtype_kwarg] = dtype_argument(dtype)
    try:
        plan = plan_call(model_class, (path,), kwargs, current, facts)
    except CannotPlan as exc:
        raise NotACheckpoint(f"{path!r}: {exc}") from None
    decision = plan.decision
    for choice in decision.choices:
        prefix = f"model.{choice.component.key or 'model'}"
        backend = choice.backend or "transformers default (sdpa, else eager)"
        out[f"{prefix}.role"] = choice.component.role
        out[f"{prefix}.class"] = choice.component.model_class
        out[f"{prefix}.backend"] = backend
        out[f"{prefix}.dtype"] = (decision.inject_dtype if choice.upgraded and decision.inject_dtype
                                  else plan.request.load_dtype or "as transformers loads it")
        reason = choice.reason + (f"; {decision.dtype_note}" if choice.upgraded and decision.dtype_note else "")
        out[f"{prefix}.reason"] = reason
    return out


def render(info: dict) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, list):
            value = "; ".join(value) if value else "-"
        elif value is None:
            value = "-"
        lines.append(f"{key:<50}{value}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="panovlm-flashpatch",
        description="What attention backend this environment (and optionally a local checkpoint) would get.",
    )
    parser.add_argument("--model", metavar="PATH", help="a local checkpoint folder: dry-run the decision from its config")
    parser.add_argument("--attn-implementation", default=None, help="the request to simulate (default: unset)")
    parser.add_argument("--dtype", default=None, help="the dtype to simulate, e.g. float32 (default: unset)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a remote-code config to load")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        info = collect(args.model, args.attn_implementation, args.dtype, args.trust_remote_code)
    except NotACheckpoint as exc:
        reporting.write_safely(sys.stderr, f"panovlm-flashpatch: {exc}\n")
        return 2
    # json.dumps escapes non-ASCII by default; the text is written with escapes where stdout cannot encode it
    # (a checkpoint path with non-ASCII characters on an ASCII terminal).
    reporting.write_safely(sys.stdout, (json.dumps(info, indent=2) if args.json else render(info)) + "\n")
    return 0
