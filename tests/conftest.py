"""Shared fixtures: isolated nnU-Net folders and a runner for console scripts (the user's entry points)."""

import os
import signal
import subprocess
import sys
import time
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
    """Absolute path of an installed console script next to the running interpreter (a path stays as it is)."""
    if os.sep in name:
        return name
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


HANG_TIMEOUT = 600  # seconds: far above any test command's run time on a loaded 2-core machine


class CommandHung(AssertionError):
    """A test command that did not exit in time: a deadlock until proven otherwise."""


def _last_line(*texts: str) -> str:
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def command_environment(extra_env: Optional[Dict[str, str]] = None,
                        env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a test command: the user's defaults plus ``extra_env`` (see ``run_command``)."""
    if env is None:
        env = {**os.environ}
        env.setdefault("nnUNet_def_n_proc", "1")
        # pytest-xdist runs two such commands at once on the 2-core machine: idle OpenMP threads then sleep instead of
        # spinning (1.6-2.7x faster test runs, measured). Thread counts and forking stay nnU-Net's, and the fork
        # deadlock of the augmentation workers reproduces under this policy too (benchmarks/fork_openmp_deadlock.py).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return {**env, **(extra_env or {})}


def _command_line(args: List) -> List[str]:
    return [console_script(str(args[0]))] + [str(a) for a in args[1:]]


def _hung(command: List[str], timeout: float, stdout: str, stderr: str) -> CommandHung:
    return CommandHung(f"{' '.join(command)} hung: no exit after {timeout:.0f} s (killed); last line: "
                       f"{_last_line(stdout, stderr)}\n--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n"
                       f"{stderr[-3000:]}")


def run_command(args: List, cwd: Optional[Path] = None, extra_env: Optional[Dict[str, str]] = None,
                timeout: float = HANG_TIMEOUT, check: bool = True,
                env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run an installed console script in a subprocess with the user's defaults plus ``extra_env``.

    nnU-Net's defaults stay as users get them: one torch thread per core on ``-device cpu`` and nnU-Net's number of
    forked augmentation workers. Only nnU-Net's export/evaluation pools are cut to one process (each spawned process
    costs seconds here and trains nothing), and idle OpenMP threads sleep instead of spinning. A command still running
    after ``timeout`` is killed with every process it started (its own session) and reported as hung, with its last
    output line. ``env`` replaces this process's environment as the base (nothing is added to it but ``extra_env``).
    """
    command = _command_line(args)
    process = subprocess.Popen(command, cwd=cwd, env=command_environment(extra_env, env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise _hung(command, timeout, stdout, stderr) from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed with exit code {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
    return result


class StartedCommand:
    """A test command running in the background (own session), its output going to ``log``: for tests that act on
    it while it runs (signals, kills) and then wait for it under the same hang guard as ``run_command``."""

    def __init__(self, args: List, log: Path, extra_env: Optional[Dict[str, str]] = None) -> None:
        self.command = _command_line(args)
        self.log = log
        with open(log, "w") as output:
            self.process = subprocess.Popen(self.command, env=command_environment(extra_env), stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = HANG_TIMEOUT) -> None:
        """Return once ``text`` is in the output; an error if the command exits first or never prints it."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.process.poll() is not None:
                raise AssertionError(f"{' '.join(self.command)} exited ({self.process.returncode}) before printing "
                                     f"{text!r}\n{self.output[-6000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise _hung(self.command, timeout, self.output, "")
            time.sleep(0.05)

    def finish(self, timeout: float = HANG_TIMEOUT) -> int:
        """The exit code, once the command has exited (killed and reported as hung after ``timeout``)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise _hung(self.command, timeout, self.output, "") from None

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def write_labeled_dataset(raw_dir: Path, dataset_id: int, name: str, shapes, spacings, seed: int = 0,
                          num_channels: int = 1) -> Path:
    """A minimal labeled nnU-Net raw dataset (random texture, one box label per case) for planner tests."""
    import numpy as np
    import SimpleITK as sitk
    import json

    folder = raw_dir / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    for case, (shape, spacing) in enumerate(zip(shapes, spacings)):
        label = np.zeros(shape, dtype=np.uint8)
        label[tuple(slice(s // 4, s // 2) for s in shape)] = 1
        for channel in range(num_channels):
            image = rng.normal(100 + 20 * channel, 10, shape).astype(np.float32) + 50 * label
            itk = sitk.GetImageFromArray(image)
            itk.SetSpacing(tuple(float(s) for s in spacing[::-1]))
            sitk.WriteImage(itk, str(folder / "imagesTr" / f"case{case:03d}_{channel:04d}.nii.gz"))
        itk_label = sitk.GetImageFromArray(label)
        itk_label.SetSpacing(tuple(float(s) for s in spacing[::-1]))
        sitk.WriteImage(itk_label, str(folder / "labelsTr" / f"case{case:03d}.nii.gz"))
    dataset_json = {
        "channel_names": {str(c): f"MRI{c}" for c in range(num_channels)},
        "labels": {"background": 0, "box": 1},
        "numTraining": len(shapes),
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


# the shortest run the smoke-run variables allow: one epoch of one training and one validation iteration
SMOKE_PRETRAINING = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "1", "nnssl_val_iterations_per_epoch": "1"}
TINY_DATASET_ID, TINY_DATASET = 31, "Dataset031_Pre"


@pytest.fixture(scope="session")
def _shared_tiny_dataset(tmp_path_factory) -> Dict[str, Path]:
    """One tiny dataset planned and preprocessed with nnsslPlannerTiny (plans nnsslPlansTiny) and
    nnsslPlannerPrimusTiny (nnsslPlansPrimusTiny), shared by every pretraining-trainer test (each trainer writes to its
    own results folder, so the runs do not interfere)."""
    root = tmp_path_factory.mktemp("tiny_pretraining")
    dirs = {variable: root / variable for variable in NNUNET_VARIABLES}
    for folder in dirs.values():
        folder.mkdir()
    write_labeled_dataset(dirs["nnUNet_raw"], TINY_DATASET_ID, "Pre", shapes=[(40, 44, 38), (36, 40, 42)],
                          spacings=[(1.2, 1.0, 1.0), (1.0, 1.1, 0.9)])
    for planner in ("nnsslPlannerTiny", "nnsslPlannerPrimusTiny"):
        run_command(["nnUNetv2_plan_and_preprocess", "-d", TINY_DATASET_ID, "-pl", planner, "-c", "3d_fullres",
                     "-np", 1, "-npfp", 1, "--no_pbar"],
                    extra_env={variable: str(folder) for variable, folder in dirs.items()})
    return dirs


@pytest.fixture
def tiny_pretraining_dataset(_shared_tiny_dataset, monkeypatch: pytest.MonkeyPatch) -> Dict[str, Path]:
    """The shared preprocessed tiny dataset, with nnU-Net's folder variables pointing at it."""
    for variable, folder in _shared_tiny_dataset.items():
        monkeypatch.setenv(variable, str(folder))
    return _shared_tiny_dataset


def pretraining_output(dirs: Dict[str, Path], trainer: str) -> Path:
    return dirs["nnUNet_results"] / TINY_DATASET / f"{trainer}__nnsslPlansTiny__3d_fullres" / "fold_all"


def pretrain_smoke(dirs: Dict[str, Path], trainer: str, extra_env: Optional[Dict[str, str]] = None):
    """Run ``nnUNetv2_train`` for a pretraining trainer on the shared tiny dataset, as users run it (nnU-Net's
    threads and forked augmentation workers), seeded: ``nnssl_seed`` swaps in batchgenerators' ordered augmenter,
    whose workers deadlocked when forked from a process with a live OpenMP pool. Returns (folder, checkpoint)."""
    import torch

    run_command(["nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", trainer, "-p", "nnsslPlansTiny",
                 "-device", "cpu"], extra_env={**SMOKE_PRETRAINING, "nnssl_seed": "0", **(extra_env or {})})
    out = pretraining_output(dirs, trainer)
    return out, torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def tiny_network(num_classes: int = 1, input_channels: int = 1):
    """A fresh dna network with the tiny preset's architecture (what the plans build)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnssl.presets import RESENC_TINY

    arch = RESENC_TINY.architecture()
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  input_channels, num_classes, deep_supervision=False)


def assert_encoder_only_checkpoint(checkpoint: dict) -> None:
    """``network_weights`` holds only ``encoder.*`` keys that load strictly into a fresh tiny network's encoder, and
    the adaptation plan points the fine-tuning path at them (VoCo, AMAES: heads/decoders are not transferable)."""
    weights = checkpoint["network_weights"]
    assert weights and all(k.startswith("encoder.") for k in weights)
    tiny_network().encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items()}, strict=True)
    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
