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
    # a few hundred microseconds on an idle machine (24 ms seen once under a load of 7); a torch import is ~1e6
    assert cumulative_us < 50_000


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


def test_trainers_and_plans_are_namespaced_in_the_wheel_and_in_a_checkout():
    import nnssl
    import nnssl.plans
    import nnssl.trainers

    package = Path(nnssl.__file__).parent
    if (package / "trainers").is_dir():  # the wheel: nothing but nnssl/ (and the hook) at the top of site-packages
        assert not (package.parent / "trainers").exists() and not (package.parent / "plans").exists()
        assert (package / "plans").is_dir()
    else:  # a source checkout (pip install -e .): the checkout's top-level folders under the same names
        assert Path(nnssl.trainers.__file__).parent == package.parent / "trainers"
        assert Path(nnssl.plans.__file__).parent == package.parent / "plans"


def test_a_source_checkout_is_found_by_the_stock_lookups():
    """What ``pip install -e .`` gives (the checkout on sys.path before the installed copy): the stock lookups find
    the checkout's classes."""
    checkout = Path(__file__).resolve().parents[1]
    code = ("import sys; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find; "
            "import nnssl; trainer = find('S3DPretrainTrainer'); print(nnssl.__file__); "
            "print(sys.modules[trainer.__module__].__file__)")
    result = python(code, PYTHONPATH=str(checkout))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(checkout / "nnssl" / "__init__.py"), str(checkout / "trainers" / "s3d.py")]


def test_a_hook_that_cannot_register_says_so_in_one_line():
    code = ("import types, nnssl.integration.hook as hook; "
            "hook.patch_module(types.ModuleType(hook.TARGET_MODULE))")
    result = python(code)
    from importlib.metadata import version

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"nnssl: cannot register its trainers and planners with nnU-Net {version('nnunetv2')}: "
                               f"nnunetv2.utilities.find_class_by_name has no recursive_find_python_class")
