"""Reading nnssl's environment variables with errors that name the variable and the bad value."""

import os
from typing import Optional


def int_from_environment(variable: str, default: Optional[int], minimum: int) -> Optional[int]:
    """The variable's value as an int of at least ``minimum``, or ``default`` when it is unset or empty."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"Environment variable {variable}={raw!r} is not a whole number. "
                         f"Set it to an integer of at least {minimum} or unset it.") from None
    if value < minimum:
        raise ValueError(f"Environment variable {variable}={raw!r} must be at least {minimum}.")
    return value


def positive_int_from_environment(variable: str, default: Optional[int]) -> Optional[int]:
    """The variable's value as a positive int, or ``default`` when it is unset or empty."""
    return int_from_environment(variable, default, minimum=1)


def flag_from_environment(variable: str) -> bool:
    """True for 1/true/yes, False when unset, empty or 0/false/no; anything else is an error naming the variable."""
    raw = os.environ.get(variable, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ValueError(f"Environment variable {variable}={raw!r} must be 1 (on) or 0 (off).")
