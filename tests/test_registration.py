"""The start-up hook: stock nnU-Net lookups find nnssl classes, lazily, without touching nnunetv2's folder."""

import re
import subprocess
import sys
from pathlib import Path


LOOKUP = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find; "
          "import nnunetv2.utilities.find_class_by_name as f, nnunetv2, os; "
          "print(find('{name}').__module__); "
          "print(f.recursive_find_python_class(os.path.join(nnunetv2.__path__[0], 'experiment_planning'), "
          "'nnsslPlannerTiny', 'nnunetv2.experiment_planning').__module__)")


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                          env={**os.environ, **env}, timeout=300)


def test_stock_lookups_find_nnssl_trainers_and_planners_and_builtins_win():
    result = python(LOOKUP.format(name="nnsslTrainer_5epochs"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["nnssl.trainers.supervised", "nnssl.plans.nnssl_planner"]
    builtin = python(LOOKUP.format(name="nnUNetTrainer"))
    assert builtin.stdout.split()[0] == "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"


def test_hook_can_be_switched_off():
    result = python(LOOKUP.format(name="nnsslTrainer"), NNSSL_DISABLE_NNUNET_HOOK="1")
    assert result.returncode != 0
    assert "Could not find requested nnunet trainer nnsslTrainer" in result.stderr


def test_start_up_hook_is_lazy():
    state = python("import sys; print(sorted(m for m in ('torch', 'nnunetv2', 'numpy') if m in sys.modules))")
    assert state.stdout.strip() == "[]"
    timing = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
    hook_lines = [line for line in timing.stderr.splitlines() if "nnssl" in line]
    assert any(line.rstrip().endswith("nnssl.integration.hook") for line in hook_lines), timing.stderr[-2000:]
    cumulative_us = max(int(re.split(r"\s*\|\s*", line.split(":", 1)[1])[1]) for line in hook_lines)
    assert cumulative_us < 20_000  # a few hundred microseconds in practice; a torch import would be ~1e6


def test_nothing_is_written_into_nnunetv2():
    """Every file in nnunetv2's installed folder is one its own wheel installed (RECORD), caches aside."""
    from importlib.metadata import distribution

    import nnunetv2

    dist = distribution("nnunetv2")
    recorded = {Path(dist.locate_file(f)).resolve() for f in dist.files}
    root = Path(nnunetv2.__path__[0])
    extra = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and p.resolve() not in recorded]
    assert extra == []


def test_only_namespaced_top_level_names_are_installed():
    import nnssl

    site_packages = Path(nnssl.__file__).parents[1]
    assert not (site_packages / "trainers").exists() and not (site_packages / "plans").exists()
    assert (site_packages / "nnssl" / "trainers").is_dir() and (site_packages / "nnssl" / "plans").is_dir()
