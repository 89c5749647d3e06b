"""Helpers shared by the benchmark scripts: interleaved repeats, robust statistics, tables, ratio lines, trainer hosts.

The benchmarks run on shared, noisy machines, so every script measures its baseline in the same run and the cases
are interleaved round by round (A, B, C, A, B, C, ...): a load spike then hits all cases of a round alike, and the
per-round ratios are far more stable than ratios of separately measured medians.

What is measured is the trainers' own code: a ``TrainerHost`` subclass borrows trainer methods as class attributes
and carries just the attributes they read, so the methods run unmodified without nnU-Net's dataset and plans files
(if a trainer starts reading more, the benchmark fails loudly with an AttributeError instead of measuring a copy).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch.profiler import ProfilerActivity, profile

from nnssl.presets import ResEncPreset


@dataclass(frozen=True)
class Summary:
    """Median and spread (min..max) of repeated measurements."""

    median: float
    low: float
    high: float

    def format(self, scale: float = 1.0) -> str:
        return f"{significant(self.median * scale)} [{significant(self.low * scale)}..{significant(self.high * scale)}]"


def significant(value: float, digits: int = 3) -> str:
    """``digits`` significant digits in plain notation (1234 -> '1234', 0.01234 -> '0.0123')."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("Nothing was measured.")
    return Summary(statistics.median(values), min(values), max(values))


def per_round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Ratios of measurements taken in the same round (same machine load)."""
    return [a / b for a, b in zip(numerator, denominator)]


def run_interleaved(cases: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call every case once per round, round-robin; each call returns one measurement."""
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, measure in cases.items():
            results[name].append(measure())
    return results


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, with queued device work finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak tensor memory allocated during one call, above the level before it.

    CUDA: the caching allocator's peak. CPU: reconstructed from the torch profiler's allocation records (every
    allocation and free, in time order), because the resident set cannot see reuse inside the C allocator's cache.
    The profiler attributes an op's allocations to its start, so transients freed inside one op are netted out.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in profiler.events()
                     if e.self_cpu_memory_usage)
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak


class TrainerHost:
    """Stands in for a trainer instance; subclasses borrow the trainer methods they need."""

    def __init__(self, configuration_manager: ConfigurationManager) -> None:
        self.configuration_manager = configuration_manager

    def print_to_log_file(self, *args: object, **kwargs: object) -> None:
        """Trainers log set-up details; a benchmark prints its own table instead."""


def preset_configuration(preset: ResEncPreset, patch_size: Sequence[int] | None = None,
                         batch_size: int | None = None) -> ConfigurationManager:
    """The plans configuration nnssl's planner writes for a preset (the fields the trainer methods read)."""
    return ConfigurationManager({"architecture": preset.architecture(),
                                 "patch_size": list(patch_size or preset.patch_size),
                                 "batch_size": batch_size or preset.batch_size, "batch_dice": False})


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def print_ratio_lines(ratios: Mapping[str, Sequence[float]]) -> None:
    """The machine-readable headline lines, one per ratio: ``ratio <name> <median>``."""
    print()
    for name, values in ratios.items():
        print(f"ratio {name} {summarize(values).median:.4f}")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small configuration that finishes in under two minutes "
                                                             "on 2 CPU cores")
    parser.add_argument("--repeats", type=int, default=None, help="measured rounds (default depends on the mode)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily pin the number of intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
