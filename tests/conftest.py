"""Shared fixtures: isolated nnU-Net folders and a runner for console scripts (the user's entry points)."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@pytest.fixture
def nnunet_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dict[str, Path]:
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results folders, exported to this process and children."""
    dirs = {}
    for variable in NNUNET_VARIABLES:
        folder = tmp_path / variable
        folder.mkdir()
        monkeypatch.setenv(variable, str(folder))
        dirs[variable] = folder
    return dirs


def console_script(name: str) -> str:
    """Absolute path of an installed console script next to the running interpreter."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def run_command(args: List[str], cwd: Optional[Path] = None, extra_env: Optional[Dict[str, str]] = None,
                timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run an installed console script in a subprocess with the current environment (plus ``extra_env``)."""
    env = dict(os.environ)
    env.setdefault("nnUNet_n_proc_DA", "0")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra_env or {})
    command = [console_script(args[0])] + [str(a) for a in args[1:]]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed with exit code {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
    return result
