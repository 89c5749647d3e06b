"""Reading nnssl's environment variables with errors that name the variable and the bad value."""

import os
from typing import Optional


def positive_int_from_environment(variable: str, default: Optional[int]) -> Optional[int]:
    """The variable's value as a positive int, or ``default`` when it is unset or empty."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"Environment variable {variable}={raw!r} is not a whole number. "
                         f"Set it to a positive integer or unset it.") from None
    if value < 1:
        raise ValueError(f"Environment variable {variable}={raw!r} must be at least 1.")
    return value
