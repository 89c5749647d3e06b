"""Start-up hook that lets stock nnU-Net commands find nnssl's planners and trainers by name.

nnU-Net resolves every class named on its command line (``-pl``, ``-tr``, ``-fpe``, the trainer stored in a
checkpoint at inference) with ``nnunetv2.utilities.find_class_by_name.recursive_find_python_class``, which only
searches nnunetv2's own folders. The wheel installs ``nnssl_nnunet_hook.pth`` into site-packages; Python executes
its single line (``import nnssl.integration.hook``) at start-up, which registers a tiny import finder and nothing else.

The finder does work only when (and if) the process imports that nnU-Net module: right after the module runs, its
``recursive_find_python_class`` is wrapped so that a name nnU-Net cannot find in its own folders is looked up in
``nnssl.trainers`` and ``nnssl.plans``. Built-in nnU-Net names always win, ``nnUNet_extTrainer`` keeps working, and
if a future nnU-Net renames the function or the wrapping fails, the hook prints one line naming the nnU-Net version
(instead of nnU-Net's bare "could not find trainer" later) and leaves nnU-Net untouched. Set
``NNSSL_DISABLE_NNUNET_HOOK=1`` to switch it off.
"""

import os
import sys

TARGET_MODULE = "nnunetv2.utilities.find_class_by_name"
TARGET_FUNCTION = "recursive_find_python_class"
DISABLE_VARIABLE = "NNSSL_DISABLE_NNUNET_HOOK"


def _searches_inside_nnunetv2(folder: str) -> bool:
    """True when nnU-Net is searching one of its own folders (not dna's, not an nnUNet_extTrainer folder)."""
    nnunetv2 = sys.modules.get("nnunetv2")
    roots = getattr(nnunetv2, "__path__", None) or []
    folder = os.path.abspath(folder)
    for root in roots:
        root = os.path.abspath(root)
        if folder == root or folder.startswith(root + os.sep):
            return True
    return False


def nnunet_version() -> str:
    try:
        from importlib.metadata import version

        return version("nnunetv2")
    except Exception:  # a source checkout of nnU-Net without metadata
        return "of unknown version"


def report_registration_failure(reason: str) -> None:
    """The one line a user sees when nnssl cannot register, printed to stderr (never raises)."""
    print(f"nnssl: cannot register its trainers and planners with nnU-Net {nnunet_version()}: {reason}. Stock "
          f"commands will not find nnssl classes; nnssl supports nnunetv2>=2.8.1,<2.9.", file=sys.stderr)


def patch_module(module) -> None:
    """Wrap the class lookup of an imported ``nnunetv2.utilities.find_class_by_name`` module (idempotent)."""
    original = getattr(module, TARGET_FUNCTION, None)
    if original is None:
        report_registration_failure(f"{TARGET_MODULE} has no {TARGET_FUNCTION}")
        return
    if getattr(original, "_nnssl_wrapped", False):
        return
    import functools

    @functools.wraps(original)
    def recursive_find_python_class(folder, class_name, *args, **kwargs):
        found = original(folder, class_name, *args, **kwargs)
        if found is None and _searches_inside_nnunetv2(folder):
            from nnssl.integration.registry import find_class

            found = find_class(class_name)
        return found

    recursive_find_python_class._nnssl_wrapped = True
    setattr(module, TARGET_FUNCTION, recursive_find_python_class)


class _PatchAfterImport:
    """``sys.meta_path`` finder: delegates to the other finders and patches the target module once it has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module):
            run_module(module)
            try:
                patch_module(module)
            except Exception as error:  # never break nnU-Net because of the hook
                report_registration_failure(f"wrapping {TARGET_MODULE}.{TARGET_FUNCTION} failed ({error!r})")

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register the finder (or patch right away if nnU-Net's lookup module is already imported)."""
    if os.environ.get(DISABLE_VARIABLE, "").lower() in ("1", "true", "yes"):
        return
    if TARGET_MODULE in sys.modules:
        patch_module(sys.modules[TARGET_MODULE])
        return
    if not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


install()
