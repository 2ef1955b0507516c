"""Start-up hook, run by the ``panovlm_flashpatch.pth`` line in site-packages at every interpreter start.

It must cost (almost) nothing, because it runs in every Python process of the environment: it
imports only the standard library (``_env`` is stdlib-only), never torch, transformers, wrapt
(wrapt alone costs 35-90 ms) or our probe. It puts a one-shot finder on ``sys.meta_path`` that waits
for two of transformers' modules:

* before ``transformers.modeling_flash_attention_utils`` executes: flash_attn_guard.py (transformers
  <= 4.53 imports flash-attn right there, so a broken flash-attn build must be hidden from it first);
* after ``transformers.modeling_utils`` has executed: the guard again (4.46-4.47 import flash-attn only
  from their model modules, later), then :func:`panovlm_flashpatch.patch.auto_apply`.

The finder removes itself once ``modeling_utils`` is done. Nothing here may raise or print: an exception
in an import hook would break the user's ``import transformers``; ours is caught and reported once as a
warning, and the ``.pth`` line itself swallows everything (a stale editable install whose source tree was
deleted must not print a traceback at every start).

Off switches, read here at start-up: ``DISABLE_FLASH_ATTN=1`` or ``PANOVLM_FLASHPATCH_AUTO=0`` register
nothing at all. Empty values mean "not set", as everywhere. A value we do not understand registers the
finder, and the settings module reports it once transformers is imported (a garbled AUTO then leaves
activation off, a garbled DISABLE_FLASH_ATTN disables).
"""

import sys

from panovlm_flashpatch import _env

TARGET = "transformers.modeling_utils"
GUARDED = "transformers.modeling_flash_attention_utils"


def _switched_off() -> bool:
    disabled, garbled_disable = _env.read(_env.DISABLE_FLASH_ATTN)
    auto, garbled_auto = _env.read(_env.AUTO)
    # A garbled value still registers the finder, so that the settings report it once transformers is
    # imported; the settings then read it the safe way (activation off, or the plugin disabled).
    return (disabled is True and not garbled_disable) or (auto is False and not garbled_auto)


def on_transformers_import(module=None) -> None:
    """Applies the patch once ``transformers.modeling_utils`` is loaded. Never raises.

    Also the target of the ``panovlm_flashpatch`` entry-point group, for tools that discover
    post-import hooks the standard way (``wrapt.discover_post_import_hooks``).
    """
    try:
        from panovlm_flashpatch import flash_attn_guard

        flash_attn_guard.hide_if_broken()
    except Exception as exc:
        _warn_once(exc)
    try:
        from panovlm_flashpatch.patch import auto_apply

        auto_apply()
    except Exception as exc:  # never break the user's import of transformers
        _warn_once(exc)


def before_flash_attention_utils(module=None) -> None:
    try:
        from panovlm_flashpatch import flash_attn_guard

        flash_attn_guard.hide_if_broken()
    except Exception as exc:
        _warn_once(exc)


_warned = []


def _warn_once(exc: BaseException) -> None:
    if _warned:
        return
    _warned.append(exc)
    try:
        import warnings

        warnings.warn(
            f"panovlm_flashpatch: automatic activation failed ({type(exc).__name__}: {exc}); "
            "transformers runs unpatched. Call panovlm_flashpatch.apply() to see the error.",
            RuntimeWarning,
            stacklevel=2,
        )
    except Exception:
        pass


class _TransformersFinder:
    """A one-shot meta-path finder: it finds nothing itself, but when the other finders find one of the two
    modules it waits for, it makes that module call our hook (before or after it executes)."""

    def __init__(self):
        self._busy = False

    def find_spec(self, name, path=None, target=None):
        if name not in (TARGET, GUARDED) or self._busy:
            return None
        self._busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        except Exception:
            return None
        finally:
            self._busy = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        real_exec = loader.exec_module
        finder = self

        def exec_module(module):
            if name == GUARDED:
                try:
                    del loader.exec_module
                except AttributeError:
                    pass
                before_flash_attention_utils(module)
                real_exec(module)
                return
            try:
                real_exec(module)
            finally:
                # Restore the loader first: the hook must run once, and the loader may be reused.
                try:
                    del loader.exec_module
                except AttributeError:
                    pass
                finder.uninstall()
            on_transformers_import(module)

        loader.exec_module = exec_module
        return spec

    def uninstall(self):
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def cancel() -> bool:
    """Takes a pending finder off ``sys.meta_path`` (``panovlm_flashpatch.remove()`` calls this, so
    that removing before transformers is imported is not undone by the start-up hook later)."""
    pending = [f for f in sys.meta_path if isinstance(f, _TransformersFinder)]
    for finder in pending:
        finder.uninstall()
    return bool(pending)


def install() -> None:
    """Called by the .pth line. Registers the finder, or applies at once if transformers'
    modeling module is already imported (for example when called after start-up)."""
    try:
        if _switched_off():
            return
        if TARGET in sys.modules:
            on_transformers_import(sys.modules[TARGET])
            return
        if not any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _TransformersFinder())
    except Exception as exc:
        _warn_once(exc)
