"""``nnssl_prepare_finetune``: plan and preprocess a labeled nnU-Net dataset to match a pretraining checkpoint."""

import argparse
import json
import os
import sys
from functools import partial
from typing import List, Optional, Sequence

from nnssl.errors import PretrainedWeightsError, UserError
from nnssl.integration.user_errors import run_user_command
from nnssl.processes import default_num_processes

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# nnU-Net's own default for 3d_fullres preprocessing; each process holds a few volumes in memory
MAX_DEFAULT_PROCESSES = 4


def check_labeled(dataset_id: int) -> str:
    """The name of raw dataset ``dataset_id``; refused when ``nnssl_ingest`` made it: its labels are placeholders
    (1 = anatomy), and fine-tuning on them would look like any other run while learning nothing of use."""
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

    names = list(find_candidate_datasets(dataset_id))
    if len(names) != 1:
        found = f"{len(names)} datasets ({', '.join(names)})" if names else "none"
        raise UserError(f"Dataset ID {dataset_id} must name exactly one dataset in nnUNet_raw, nnUNet_preprocessed "
                        f"and nnUNet_results; found {found}. Check -d and the nnUNet_* variables.")
    dataset_json = os.path.join(os.environ["nnUNet_raw"], names[0], "dataset.json")
    if os.path.isfile(dataset_json):
        with open(dataset_json) as file:
            content = json.load(file)
        if content.get("unlabeled") is True or (content.get("nnssl") or {}).get("unlabeled") is True:
            raise UserError(f"{dataset_json} marks {names[0]} as unlabeled: nnssl_ingest made it and its labels are "
                            f"placeholders (1 = anatomy), not a segmentation to fine-tune on. Pass -d the ID of a "
                            f"labeled nnU-Net dataset (real labels in labelsTr); pretrain on {names[0]} instead "
                            f"(nnUNetv2_plan_and_preprocess -d {dataset_id} -pl nnsslPlanner).")
    return names[0]


def require_adaptation_plan(checkpoint: dict, checkpoint_path: str) -> dict:
    """The checkpoint's ``nnssl_adaptation_plan``; an error saying where to get one when it has none."""
    if "nnssl_adaptation_plan" not in checkpoint:
        spark = ("The reference's Spark trainers save none: add it with the reference's "
                 "'python -m nnssl.utilities.add_adaptation_plan' (its -arch ResEncL defaults), then pass that "
                 "checkpoint. ") if "spark_weights" in checkpoint else ""
        raise PretrainedWeightsError(
            f"{checkpoint_path} has no 'nnssl_adaptation_plan': it was not written by an nnssl pretraining trainer "
            f"(or by nnssl). {spark}Use a pretraining checkpoint, or plan with nnsslPlanner and nnU-Net's "
            f"-pretrained_weights.")
    return checkpoint["nnssl_adaptation_plan"]


def prepare_finetune(dataset_id: int, checkpoint_path: str, plans_name: Optional[str] = None,
                     adaptation_mode: Optional[str] = None, override_spacing: Optional[Sequence[float]] = None,
                     num_processes: Optional[int] = None, num_processes_fingerprint: Optional[int] = None,
                     preprocess: bool = True,
                     verbose: bool = False, architecture: str = "pretrained",
                     patch_size: Optional[Sequence[int]] = None, checkpoint: Optional[dict] = None) -> dict:
    """Fingerprint (if needed), plan with the planner of ``architecture`` and preprocess ``3d_fullres``; return the
    plans. Plans name and adaptation mode left at None are the architecture's defaults (``ARCHITECTURES``), process
    counts left at None are sized to the machine (``default_num_processes``); ``patch_size`` replaces the
    checkpoint's recommended downstream patch (``pretrained`` architecture only: ``dynamic`` plans nnU-Net's).
    ``checkpoint``: the checkpoint's content when the caller has it in memory (a pretraining run planning for its own
    future ``checkpoint_path``)."""
    missing = [v for v in NNUNET_FOLDERS[:2] if not os.environ.get(v)]
    if missing:
        raise UserError(f"Environment variable(s) {', '.join(missing)} not set: nnssl_prepare_finetune reads the "
                        f"labeled dataset from nnUNet_raw and writes plans and data to nnUNet_preprocessed.")
    check_labeled(dataset_id)
    if patch_size is not None and architecture == "dynamic":
        raise UserError("-ps/--patch_size goes with --architecture pretrained: --architecture dynamic takes nnU-Net's "
                        "patch for this dataset. Drop -ps, or plan with the checkpoint's architecture.")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset

    from nnssl.finetuning.adaptation_plan import nnunet_architecture
    from nnssl.finetuning.downstream_patch import check_downstream_patch
    from nnssl.finetuning.transfer import check_weights_match_adaptation_plan, load_pretrained_checkpoint

    if checkpoint is None:
        checkpoint = load_pretrained_checkpoint(checkpoint_path)
    require_adaptation_plan(checkpoint, checkpoint_path)
    check_weights_match_adaptation_plan(checkpoint, checkpoint_path)
    if patch_size is not None:  # refused before the fingerprint, not after it
        check_downstream_patch(patch_size, nnunet_architecture(checkpoint["nnssl_adaptation_plan"]))
    num_processes = num_processes or default_num_processes(MAX_DEFAULT_PROCESSES)
    num_processes_fingerprint = num_processes_fingerprint or default_num_processes(MAX_DEFAULT_PROCESSES)
    extract_fingerprint_dataset(dataset_id, num_processes=num_processes_fingerprint, clean=False, verbose=verbose)
    planner_class = finetune_planner_class(architecture)
    planner = planner_class(dataset_id, checkpoint_path, checkpoint, adaptation_mode or ARCHITECTURES[architecture],
                            override_spacing, plans_name, patch_size)
    plans = planner.plan_experiment()
    if preprocess:
        preprocess_dataset(dataset_id, planner.plans_identifier, ["3d_fullres"], [num_processes], verbose=verbose)
    return plans


# --architecture: the planner's default adaptation mode (spacing) per choice
ARCHITECTURES = {"pretrained": "like_pretrained", "dynamic": "default_nnunet"}


def finetune_planner_class(architecture: str) -> type:
    """``pretrained``: the checkpoint's architecture and patch (every tensor transfers); ``dynamic``: nnU-Net's ResEnc
    plans for this dataset, loaded by name and shape."""
    if architecture not in ARCHITECTURES:
        raise UserError(f"Unknown --architecture {architecture!r}; choose one of {list(ARCHITECTURES)}.")
    if architecture == "dynamic":
        from nnssl.plans.dynamic_finetune_planner import nnsslDynamicFinetunePlanner
        return nnsslDynamicFinetunePlanner
    from nnssl.plans.finetune_planner import nnsslFinetunePlanner
    return nnsslFinetunePlanner


def build_parser() -> argparse.ArgumentParser:
    cores = default_num_processes(MAX_DEFAULT_PROCESSES)
    parser = argparse.ArgumentParser(
        prog="nnssl_prepare_finetune",
        description="Plan and preprocess a labeled nnU-Net dataset (in nnUNet_raw) so that it matches a pretraining "
                    "checkpoint: same architecture, patch and normalisation, spacing per adaptation mode (with "
                    "--architecture dynamic: nnU-Net's ResEnc plans for this dataset, z-score). Then "
                    "fine-tune with: nnUNetv2_train ID 3d_fullres FOLD -tr nnsslFinetuneTrainer -p PLANS_NAME")
    parser.add_argument("-d", type=int, required=True, metavar="ID", help="[REQUIRED] dataset ID of the labeled dataset")
    parser.add_argument("-c", "--checkpoint", required=True, metavar="CHECKPOINT",
                        help="[REQUIRED] pretraining checkpoint (.pth with network_weights and nnssl_adaptation_plan:"
                             " written by an nnssl pretraining trainer or by nnssl, e.g. the OpenMind checkpoints)")
    parser.add_argument("-p", "--plans_name", default=None, metavar="PLANS_NAME",
                        help="plans name to write (default: nnsslFinetunePlans, with --architecture dynamic "
                             "nnsslDynamicFinetunePlans); also the data identifier prefix")
    parser.add_argument("-am", "--adaptation_mode", default=None,
                        choices=["like_pretrained", "default_nnunet", "fixed", "no_resample"],
                        help="target spacing: the pretraining one (like_pretrained, the default), nnU-Net's default "
                             "for this dataset (default_nnunet, the default with --architecture dynamic), a fixed "
                             "one given with -os (fixed), or no resampling (no_resample)")
    parser.add_argument("--architecture", default="pretrained", choices=list(ARCHITECTURES),
                        help="pretrained (default): the checkpoint's architecture and patch, every pretrained tensor "
                             "transfers; dynamic: nnU-Net's ResEnc plans for this dataset (its spacing, patch, "
                             "stages and kernels), loading every pretrained tensor whose name and shape fit")
    parser.add_argument("-os", "--override_spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="target spacing in mm (nnU-Net axis order) for -am fixed")
    parser.add_argument("-ps", "--patch_size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="downstream patch size (nnU-Net axis order; default: the checkpoint's recommended "
                             "downstream patch); each a multiple of the U-Net's total stride or the Primus patch "
                             "embedding. A Primus's positional embedding is resampled to the new token grid")
    parser.add_argument("-np", type=int, default=cores, metavar="N",
                        help=f"processes for preprocessing (default: min({MAX_DEFAULT_PROCESSES}, cores) = "
                             f"%(default)s on this machine)")
    parser.add_argument("-npfp", type=int, default=cores, metavar="N",
                        help=f"processes for fingerprint extraction (default: min({MAX_DEFAULT_PROCESSES}, cores) = "
                             f"%(default)s on this machine)")
    parser.add_argument("--no_pp", action="store_true", help="only plan, do not preprocess")
    parser.add_argument("--verbose", action="store_true",
                        help="let nnU-Net's fingerprint extraction and preprocessing print per-case details")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.np < 1 or args.npfp < 1:
        parser.error("-np and -npfp must be at least 1")
    return run_user_command("nnssl_prepare_finetune", partial(run, args), kept=lambda: (
        "The fingerprint, plans and preprocessed data written so far stay in nnUNet_preprocessed; rerun the same "
        "command to complete them."))


def run(args: argparse.Namespace) -> int:
    plans = prepare_finetune(args.d, args.checkpoint, args.plans_name, args.adaptation_mode, args.override_spacing,
                             args.np, args.npfp, not args.no_pp, args.verbose, args.architecture, args.patch_size)
    config = plans["configurations"]["3d_fullres"]
    print(f"Plans {plans['plans_name']} written for {plans['dataset_name']}: spacing {config['spacing']}, patch "
          f"{config['patch_size']}, batch {config['batch_size']}. Fine-tune with:\n  nnUNetv2_train "
          f"{args.d} 3d_fullres 0 -tr nnsslFinetuneTrainer -p {plans['plans_name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
