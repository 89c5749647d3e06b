"""Find nnssl's nnU-Net classes (planners, fingerprint extractors, trainers) by class name.

A process whose nnU-Net command uses an nnssl class also gets nnssl's one-line reporting of user errors
(``nnssl.integration.user_errors``): from then on, the errors nnssl raises there are nnssl's to report.
"""

import importlib
import inspect
import pkgutil
from functools import lru_cache
from typing import Optional

from nnssl.integration.user_errors import install_excepthook

SEARCHED_PACKAGES = ("nnssl.plans", "nnssl.trainers")


@lru_cache(maxsize=None)
def find_class(class_name: str) -> Optional[type]:
    """Import the modules of ``SEARCHED_PACKAGES`` in order and return the first class called ``class_name``."""
    for package_name in SEARCHED_PACKAGES:
        package = importlib.import_module(package_name)
        for module_info in pkgutil.walk_packages(package.__path__, prefix=package_name + "."):
            module = importlib.import_module(module_info.name)
            candidate = getattr(module, class_name, None)
            if inspect.isclass(candidate):
                install_excepthook()
                return candidate
    return None
