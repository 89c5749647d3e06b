"""Default process counts sized to the machine: a default never asks for more worker processes than the cores this
process may run on (a 2-core laptop, or a SLURM job restricted to some of a node's cores)."""

import os


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def default_num_processes(cap: int) -> int:
    """min(cap, available cores), at least 1."""
    return max(1, min(cap, available_cores()))
