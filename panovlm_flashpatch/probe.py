"""Capability probe: the one place that reads the machine (torch.cuda, the flash-attn extension).

``probe()`` is the single seam tests replace: everything after it (decide, load, report) runs for
real. Results are cached per process; the probe never runs at import time of our package.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import threading

from .compat import parse_version

#: transformers' own floor for FlashAttention-2 (5.x compatibility matrix).
MIN_FLASH_ATTN = "2.3.3"
#: FlashAttention-2 kernels exist for Ampere (sm_80) and newer only; transformers never checks it.
MIN_COMPUTE_CAPABILITY = (8, 0)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    bf16: bool


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What this process can run. Failures are kept as readable strings, never raised.

    Attributes:
        torch_version: ``torch.__version__``.
        cuda_available: ``torch.cuda.is_available()``.
        devices: the CUDA devices the model will land on (empty when none is visible).
        flash_attn_version: installed distribution version, or None.
        flash_attn_error: why flash-attn cannot be used (absent, extension fails to import), or None.
        kernels_version: the ``kernels`` package, whose presence lets transformers swap a missing
            flash-attn for a downloaded hub kernel; reported, never used.
        fa3_version, fa4_version: FlashAttention-3 (``flash-attn-3``, module ``flash_attn_interface``) and
            FlashAttention-4 (``flash-attn-4``, module ``flash_attn.cute``), when installed; detected and
            reported (backends.py says why neither is chosen automatically yet).
        fa3_error, fa4_error: why each cannot be used, or None.
    """

    torch_version: str = ""
    cuda_available: bool = False
    devices: tuple[DeviceInfo, ...] = ()
    flash_attn_version: str | None = None
    flash_attn_error: str | None = "flash-attn is not installed"
    kernels_version: str | None = None
    fa3_version: str | None = None
    fa3_error: str | None = "flash-attn-3 is not installed (module flash_attn_interface)"
    fa4_version: str | None = None
    fa4_error: str | None = "flash-attn-4 is not installed (module flash_attn.cute)"

    @property
    def capability(self) -> tuple[int, int] | None:
        """The lowest compute capability among the devices (None: no GPU)."""
        return min((d.compute_capability for d in self.devices), default=None)

    def fa2_blockers(self) -> tuple[str, ...]:
        """Every environment reason FlashAttention-2 cannot run, worded "needs X, found Y"."""
        reasons = []
        if self.flash_attn_error:
            reasons.append(self.flash_attn_error)
        elif self.flash_attn_version and parse_version(self.flash_attn_version) < parse_version(MIN_FLASH_ATTN):
            reasons.append(f"needs flash-attn >= {MIN_FLASH_ATTN}, found {self.flash_attn_version}")
        if not self.cuda_available or not self.devices:
            reasons.append("needs a CUDA GPU, found none visible to torch")
        else:
            for dev in self.devices:
                if dev.compute_capability < MIN_COMPUTE_CAPABILITY:
                    major, minor = dev.compute_capability
                    reasons.append(
                        f"needs compute capability >= 8.0, found {major}.{minor} on cuda:{dev.index} ({dev.name})"
                    )
        return tuple(reasons)

    @property
    def bf16(self) -> bool:
        return bool(self.devices) and all(d.bf16 for d in self.devices)

    def summary(self) -> str:
        """One phrase for the log: ``flash-attn 2.8.3 on NVIDIA H100 (sm_90)``."""
        where = ", ".join(
            f"{d.name} (sm_{d.compute_capability[0]}{d.compute_capability[1]})" for d in self.devices
        ) or "no GPU"
        return f"flash-attn {self.flash_attn_version or 'absent'} on {where}"


_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _flash_attn_status() -> tuple[str | None, str | None]:
    """(version, error). Imports the compiled extension: metadata alone passes broken builds."""
    version = None
    for dist in ("flash_attn", "flash-attn"):
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    if version is None:
        return None, "flash-attn is not installed"
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        importlib.import_module("flash_attn_2_cuda")
        importlib.import_module("flash_attn")
    except BaseException as exc:  # undefined symbol, ABI mismatch, missing CUDA runtime, ...
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        from .reporting import sentence

        first_line = sentence((str(exc).strip().splitlines() or [""])[0], 300)
        return version, f"flash-attn {version} is installed but its CUDA extension fails to import: {type(exc).__name__}: {first_line}"
    return version, None


def _distribution(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def _rung_status(dists: tuple[str, ...], module: str, label: str) -> tuple[str | None, str | None]:
    """(version, error) of an optional FlashAttention generation: installed, and its module imports."""
    version = _distribution(*dists)
    if version is None:
        return None, f"{label} is not installed (module {module})"
    try:
        import torch  # noqa: F401

        importlib.import_module(module)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        from .reporting import sentence

        first_line = sentence((str(exc).strip().splitlines() or [""])[0], 200)
        return version, f"{label} {version} is installed but {module} fails to import: {type(exc).__name__}: {first_line}"
    return version, None


@functools.lru_cache(maxsize=1)
def _kernels_version() -> str | None:
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> DeviceInfo:
    import torch

    props = torch.cuda.get_device_properties(index)
    cc = (int(props.major), int(props.minor))
    return DeviceInfo(index=index, name=str(props.name), compute_capability=cc, bf16=cc >= (8, 0))


def _resolve_devices(devices: tuple[int, ...] | None) -> tuple[int, ...]:
    import torch

    count = torch.cuda.device_count()
    if devices is None:
        return (torch.cuda.current_device(),) if count else ()
    return tuple(i for i in devices if 0 <= i < count) or ((torch.cuda.current_device(),) if count else ())


def probe(devices: tuple[int, ...] | None = None) -> Capabilities:
    """Probes the environment for a load whose model will land on ``devices`` (CUDA indices).

    Args:
        devices: indices of the CUDA devices the model will use; None means the current device.

    Returns:
        A :class:`Capabilities`. Cheap after the first call (every part is cached).
    """
    with _lock:
        import torch

        cuda = bool(torch.cuda.is_available())
        infos = tuple(_device_info(i) for i in _resolve_devices(devices)) if cuda else ()
        version, error = _flash_attn_status()
        fa3 = _rung_status(("flash-attn-3", "flash_attn_3"), "flash_attn_interface", "flash-attn-3")
        fa4 = _rung_status(("flash-attn-4", "flash_attn_4"), "flash_attn.cute", "flash-attn-4")
        return Capabilities(
            torch_version=str(torch.__version__),
            cuda_available=cuda,
            devices=infos,
            flash_attn_version=version,
            flash_attn_error=error,
            kernels_version=_kernels_version(),
            fa3_version=fa3[0],
            fa3_error=fa3[1],
            fa4_version=fa4[0],
            fa4_error=fa4[1],
        )


def cache_clear() -> None:
    """Forgets every cached result (tests, or after installing flash-attn in a running process)."""
    _flash_attn_status.cache_clear()
    _kernels_version.cache_clear()
    _rung_status.cache_clear()
    _device_info.cache_clear()
