"""A broken flash-attn build must not break transformers: hide it from transformers <= 4.53.

Why: transformers up to 4.53 imports flash-attn when its model modules are imported, as soon as
flash-attn's package metadata says it is installed (and CUDA is available). A build that no longer
matches torch (``undefined symbol``) then fails every ``import`` of a model module, even for a model that
was asked to run SDPA: ``RuntimeError: Failed to import transformers.models.qwen2.modeling_qwen2``.
transformers >= 4.54 imports flash-attn only when FlashAttention-2 is asked for, which the plugin never
does when the extension is broken.

What: once, before transformers can import flash-attn (the start-up hook calls this before
``transformers.modeling_flash_attention_utils`` executes, and again after ``modeling_utils``; ``apply()``
calls it too), the probe imports flash-attn's CUDA extension. When it fails, transformers' availability
check (``is_flash_attn_2_available``) answers False from then on, so its models import and load on SDPA,
and one warning names the import error and the fix.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys

from . import reporting
from .compat import parse_version

_NAME = "is_flash_attn_2_available"
_done: list[str] = []


def _unavailable(*args, **kwargs) -> bool:
    return False


def hide_if_broken() -> str | None:
    """Hides a broken flash-attn from transformers <= 4.53. Returns the import error it found, if any."""
    if _done:
        return _done[0] or None
    error = _broken_extension()
    _done.append(error or "")
    if not error:
        return None
    import transformers.utils.import_utils as import_utils

    setattr(import_utils, _NAME, _unavailable)
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers") and module is not None and callable(vars(module).get(_NAME)):
            setattr(module, _NAME, _unavailable)
    reporting.log_once("flash-attn-hidden", logging.WARNING,
                       f"{error}. transformers {_transformers_version()} would import it with every model module and "
                       "fail; it is told flash-attn is unavailable, so models import and load on SDPA. Reinstall a "
                       "flash-attn built for this torch to use it.")
    return error


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _broken_extension() -> str | None:
    if parse_version(_transformers_version())[:2] >= (4, 54):
        return None  # imports flash-attn only when asked for FlashAttention-2
    try:
        importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        return None
    from .probe import _flash_attn_status

    _, error = _flash_attn_status()
    return error if error and "fails to import" in error else None
