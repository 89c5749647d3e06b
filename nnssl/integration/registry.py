"""Find nnssl's nnU-Net classes (planners, fingerprint extractors, trainers) by class name."""

import importlib
import inspect
import pkgutil
from functools import lru_cache
from typing import Optional

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
                return candidate
    return None
