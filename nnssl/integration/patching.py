"""Temporarily replacing one name in an nnU-Net module, for the few places where released nnU-Net offers no hook."""

from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def replaced_attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` while the context is active; the original is restored on exit, also after errors."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
