"""Helpers of the bad-input tests: one-line errors, unwritable folders (also when the tests run as root), datasets
that must be consistent."""

import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

import pytest

COMMAND_TIMEOUT = 300


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with one stderr line holding every fragment, and printed no traceback; returns the line."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if all(fragment in line for fragment in fragments)]
    assert len(lines) == 1, (fragments, result.stderr)
    return lines[0]


def dataset_is_consistent(folder: Path) -> int:
    """Every image has its label and dataset.json counts them; no staging folder is left. Returns the case count."""
    images = sorted(name[:-len("_0000.nii.gz")] for name in os.listdir(folder / "imagesTr"))
    labels = sorted(name[:-len(".nii.gz")] for name in os.listdir(folder / "labelsTr"))
    assert images == labels
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == len(images) > 0
    return len(images)


def staging_leftovers(raw: Path) -> List[str]:
    """Hidden staging folders of nnssl_ingest anywhere in ``raw``."""
    return [str(path) for path in raw.rglob(".nnssl_ingest_tmp_*")]


@contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """``folder`` cannot take new files while the context is active, also for root (who ignores permission bits:
    the folder is made immutable then); skips the test where neither works."""
    as_root = os.geteuid() == 0
    if as_root:
        made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, timeout=30).returncode == 0 \
            if shutil.which("chattr") else False
    else:
        folder.chmod(0o555)
        made = True
    try:
        if not made or _can_create_in(folder):
            pytest.skip(f"cannot make {folder} unwritable here")
        yield
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True, timeout=30)
        else:
            folder.chmod(0o755)


def _can_create_in(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
