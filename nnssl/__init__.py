"""nnssl: self-supervised pretraining for 3D segmentation CNNs as a plugin for stock nnU-Net v2.

Importing this package must stay cheap: the start-up hook (``nnssl.integration.hook``) imports it in every Python
process of the environment, so no torch or nnU-Net import happens here.
"""

import os
import sys

__version__ = "0.2.0"

SHIPPED_SUBPACKAGES = ("trainers", "plans")


def _register_checkout_subpackages() -> None:
    """The wheel ships the repository's top-level ``trainers/`` and ``plans/`` as ``nnssl.trainers`` and
    ``nnssl.plans``. A source checkout (``pip install -e .``, or the checkout on ``PYTHONPATH``) has them next to
    ``nnssl/`` instead: register them under the same names, so that imports and the stock commands' class lookup
    behave the same in both installs. The wheel's path costs two ``isdir`` calls."""
    package_folder = os.path.dirname(os.path.abspath(__file__))
    for name in SHIPPED_SUBPACKAGES:
        source = os.path.join(os.path.dirname(package_folder), name)
        if os.path.isdir(os.path.join(package_folder, name)) or not os.path.isfile(os.path.join(source, "__init__.py")):
            continue  # the wheel's layout, or not a checkout
        import importlib.util

        qualified = f"{__name__}.{name}"
        spec = importlib.util.spec_from_file_location(qualified, os.path.join(source, "__init__.py"),
                                                      submodule_search_locations=[source])
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
        globals()[name] = module


_register_checkout_subpackages()
