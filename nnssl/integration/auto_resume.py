"""Automatic resume: a run that torchrun restarted, that SLURM requeued, that stopped at a preemption request, or that
was started with ``nnssl_auto_resume=1`` continues from its own checkpoint as ``--c`` would.

"Its own": the checkpoint must come from the same trainer, dataset, plans (name and content of the configuration),
configuration and fold; anything else stops with an error naming what differs, so that a fresh run never silently
continues a different one. ``nnssl_auto_resume=0`` turns all of it off (every start is a fresh start, as nnU-Net's).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Mapping, Optional

from nnssl.errors import UserError
from nnssl.integration.checkpoint import PREVIOUS, RESUME_ORDER
from nnssl.integration.environment import EnvironmentVariableError, text_from_environment

AUTO_RESUME_VARIABLE = "nnssl_auto_resume"
RESTART_COUNTERS = {"TORCHELASTIC_RESTART_COUNT": "torchrun restart", "SLURM_RESTART_COUNT": "SLURM requeue"}
# where a resume looks, in this order: nnU-Net's --c order with the previous generation before the best checkpoint
RESUME_CANDIDATES = RESUME_ORDER[:2] + (PREVIOUS,) + RESUME_ORDER[2:]


class RunMismatchError(UserError, RuntimeError):
    """The output folder holds a checkpoint of a different run than the one starting (the message says what)."""


def auto_resume_setting() -> Optional[bool]:
    """``nnssl_auto_resume``: True (resume whenever a checkpoint exists), False (never), None (unset: on restarts,
    requeues and after preemption)."""
    raw = text_from_environment(AUTO_RESUME_VARIABLE)
    if raw is None:
        return None
    if raw in ("0", "1"):
        return raw == "1"
    raise EnvironmentVariableError(f"Environment variable {AUTO_RESUME_VARIABLE}={raw!r} must be 1 (resume from the "
                                   f"run's checkpoint whenever there is one) or 0 (never resume by itself).")


def restart_reason(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """"torchrun restart 2" when this process is a restart or requeue of an earlier attempt, else None."""
    for variable, what in RESTART_COUNTERS.items():
        value = environ.get(variable, "0").strip() or "0"
        if value.isdigit() and int(value) > 0:
            return f"{what} {int(value)} ({variable}={value})"
    return None


def resume_candidate(output_folder: str) -> Optional[str]:
    """The checkpoint a resume would start from, or None when the folder has none."""
    for name in RESUME_CANDIDATES:
        path = os.path.join(output_folder, name)
        if os.path.isfile(path):
            return path
    return None


def run_identity(trainer_name: str, init_args: Mapping) -> Dict[str, str]:
    """What makes two trainings the same run, from a trainer's name and its nnU-Net ``init_args`` (which every
    nnU-Net checkpoint keeps): trainer, dataset, plans name, configuration, fold, and a digest of the configuration's
    resolved plans with the normalisation's intensity statistics."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, configuration = init_args["plans"], init_args["configuration"]
    content = {"configuration": PlansManager(plans).get_configuration(configuration).configuration,
               "intensity": plans.get("foreground_intensity_properties_per_channel")}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"trainer": trainer_name, "dataset": str(plans.get("dataset_name")), "plans": str(plans.get("plans_name")),
            "configuration": str(configuration), "fold": str(init_args["fold"]), "plans content": digest}


def check_same_run(checkpoint: Mapping, current: Dict[str, str], path: str) -> None:
    """Refuse a checkpoint of another run, naming every difference and both ways on."""
    if "init_args" not in checkpoint or "trainer_name" not in checkpoint:
        raise RunMismatchError(f"{path} is not an nnU-Net training checkpoint (no trainer name or init_args), so it "
                               f"cannot be checked to belong to this run. Move it away to start over, or resume it "
                               f"explicitly with --c.")
    saved = run_identity(checkpoint["trainer_name"], checkpoint["init_args"])
    differences = [f"{key} {saved[key]!r} there, {current[key]!r} now" for key in current if saved[key] != current[key]]
    if differences:
        raise RunMismatchError(f"{path} belongs to a different run ({'; '.join(differences)}), so it is not resumed "
                               f"automatically. Move the folder's checkpoints away (or set {AUTO_RESUME_VARIABLE}=0) "
                               f"to start over, or resume it explicitly with --c.")
