"""``benchmarks/gpu_check.py --dry-run``: every section of the one-shot GPU check runs on the CPU at tiny sizes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--workdir",
                             str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["dry_run"] and figures["device_name"] == "cpu"
    sections = (figures["pipeline"], figures["end_to_end"], *figures["step"].values())
    assert not any("error" in section for section in sections)
    assert figures["step"]["eager"]["steps_per_second"] > 0 and figures["step"]["channels_last"]["peak_memory_mib"] > 0
    assert "skipped" in figures["step"]["compile"]
    assert figures["device_augmentation"]["read_size"] == [124, 124, 124]  # the tiny preset's pre-rotation patch
    assert figures["pipeline"]["s3d_pretraining"]["patches_per_second"] > 0
    e2e = figures["end_to_end"]
    assert e2e["steps_per_second"] > 0
    assert (e2e["gpu_idle_fraction"] is None) == (shutil.which("nvidia-smi") is None)
    ratio_lines = [line.split() for line in result.stdout.splitlines() if line.startswith("ratio ")]
    assert {name for _, name, _ in ratio_lines} == set(figures["ratios"])
    assert {"s3d_step_channels_last_vs_eager", "s3d_pipeline_patches_vs_step_demand",
            "end_to_end_steps_vs_eager_step"} <= set(figures["ratios"])
