"""nnssl: self-supervised pretraining for 3D segmentation CNNs as a plugin for stock nnU-Net v2.

Importing this package must stay cheap: the start-up hook (``nnssl.integration.hook``) imports it in every Python
process of the environment, so no torch or nnU-Net import happens here.
"""

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

SHIPPED_SUBPACKAGES = ("trainers", "plans")


def _register_checkout_subpackages() -> None:
    """The wheel ships the repository's top-level ``trainers/`` and ``plans/`` as ``nnssl.trainers`` and
    ``nnssl.plans``. A source checkout (``pip install -e .``, or the checkout on ``PYTHONPATH``) has them next to
    ``nnssl/`` instead: register them under the same names, so that imports and the stock commands' class lookup
    behave the same in both installs."""
    package_folder = Path(__file__).resolve().parent
    for name in SHIPPED_SUBPACKAGES:
        source = package_folder.parent / name
        if (package_folder / name).is_dir() or not (source / "__init__.py").is_file():
            continue  # the wheel's layout, or not a checkout
        qualified = f"{__name__}.{name}"
        spec = importlib.util.spec_from_file_location(qualified, source / "__init__.py",
                                                      submodule_search_locations=[str(source)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
        globals()[name] = module


_register_checkout_subpackages()
