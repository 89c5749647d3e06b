"""``nnssl_train``: ``nnUNetv2_train`` that torchrun can launch, on any number of nodes, GPUs or CPU processes.

``torchrun --nnodes N --nproc_per_node G --no-python nnssl_train DATASET 3d_fullres all -tr S3DPretrainTrainer -p
nnsslPlans``. Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) every process joins the
process group (NCCL with ``-device cuda``, gloo with ``-device cpu``), trains on ``cuda:<LOCAL_RANK>`` or the CPU with
plans batch / world size samples, and runs nnU-Net's trainer lifecycle (output folders, ``--c``, ``--val``,
``-pretrained_weights`` as ``nnUNetv2_train``); at the end every rank prints a checksum line of its weights. Without
torchrun's environment the arguments go unchanged to nnU-Net's ``run_training``: exactly ``nnUNetv2_train``.
"""

import argparse
import sys
from functools import partial
from typing import List, Optional, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint, run_training
from torch.backends import cudnn

from nnssl.integration.checkpoint import unwrap
from nnssl.integration.distributed import (TorchrunEnvironment, backend_for, configure_threads, per_rank_batch_size,
                                           place_trainer_on, torchrun_environment, torchrun_session)
from nnssl.integration.user_errors import run_user_command
from nnssl.integration.weights_checksum import format_checksums, state_dict_checksums


def build_parser() -> argparse.ArgumentParser:
    """nnUNetv2_train's arguments (names, defaults and meaning unchanged)."""
    parser = argparse.ArgumentParser(prog="nnssl_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_name_or_id", help="dataset name or ID to train with")
    parser.add_argument("configuration", help="configuration to train, e.g. 3d_fullres")
    parser.add_argument("fold", help="fold of the 5-fold cross-validation (0-4) or 'all'")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer class (default: nnUNetTrainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-pretrained_weights", default=None,
                        help="nnU-Net checkpoint to initialise the network from (only when training starts)")
    parser.add_argument("-num_gpus", type=int, default=1,
                        help="nnU-Net's single-node DDP (mp.spawn) for plain launches; not used under torchrun")
    parser.add_argument("--npz", action="store_true", help="also save softmax predictions of the final validation")
    parser.add_argument("--c", action="store_true", help="continue training from the latest checkpoint")
    parser.add_argument("--val", action="store_true", help="only run the validation (training must be finished)")
    parser.add_argument("--val_best", action="store_true", help="validate with checkpoint_best instead of final")
    parser.add_argument("--disable_checkpointing", action="store_true", help="write no checkpoints")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"),
                        help="cuda (NCCL under torchrun), cpu (gloo under torchrun) or mps (plain launches only); "
                             "pick GPUs with CUDA_VISIBLE_DEVICES")
    return parser


def parse_fold(fold: str) -> Union[int, str]:
    if fold == "all":
        return fold
    try:
        return int(fold)
    except ValueError:
        raise SystemExit(f"nnssl_train: fold must be an integer or 'all', got {fold!r}.") from None


def check_flags(args: argparse.Namespace) -> None:
    if args.c and args.val:
        raise SystemExit("nnssl_train: --c and --val cannot be combined (--val only validates a finished training).")
    if args.val_best and args.disable_checkpointing:
        raise SystemExit("nnssl_train: --val_best needs checkpoint_best.pth; it cannot be combined with "
                         "--disable_checkpointing.")


def print_whole_line(text: str) -> None:
    """All ranks share torchrun's stdout: pending output first, then the line in one write, so that no other rank's
    output lands inside it."""
    sys.stdout.flush()
    print(text, flush=True)


def build_trainer(dataset_name_or_id: str, configuration: str, fold: Union[int, str], trainer_name: str,
                  plans_identifier: str, continue_training: bool, env: TorchrunEnvironment, device: torch.device):
    """nnU-Net's trainer for this rank, on this rank's device, and this rank's share of the plans' batch (refused
    when the world size does not divide it)."""
    trainer = get_trainer_from_args(dataset_name_or_id, configuration, fold, trainer_name, plans_identifier,
                                    continue_training, device=device)
    place_trainer_on(trainer, device)
    return trainer, per_rank_batch_size(trainer.configuration_manager.batch_size, env.world_size)


def run_under_torchrun(args: argparse.Namespace, env: TorchrunEnvironment) -> None:
    """nnU-Net's trainer lifecycle (as ``nnUNetv2_train``) on every rank, inside the job's process group."""
    if args.num_gpus != 1:
        raise SystemExit("nnssl_train: -num_gpus is nnU-Net's single-node launcher; under torchrun the processes are "
                         "--nnodes x --nproc_per_node. Drop -num_gpus.")
    with torchrun_session(env, args.device) as device:
        train_on_this_rank(args, env, device)


def train_on_this_rank(args: argparse.Namespace, env: TorchrunEnvironment, device: torch.device) -> None:
    """Build, train and validate this rank's trainer, then print its weights checksum line. A function of its own so
    that the trainer (and its DDP reducer) is released before the process group is left."""
    tag = f"nnssl_train rank {env.rank}/{env.world_size}"
    trainer, rank_batch = build_trainer(args.dataset_name_or_id, args.configuration, parse_fold(args.fold), args.tr,
                                        args.p, args.c, env, device)
    trainer.disable_checkpointing = args.disable_checkpointing
    maybe_load_checkpoint(trainer, args.c, args.val, args.pretrained_weights)
    print_whole_line(f"{tag} (local rank {env.local_rank}, {device}, {backend_for(device)}): batch "
                     f"{rank_batch} of {trainer.configuration_manager.batch_size}, starting at epoch "
                     f"{trainer.current_epoch}")
    if device.type == "cuda":
        cudnn.deterministic = False
        cudnn.benchmark = True
    if not args.val:
        trainer.run_training()
    if args.val_best:
        trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))
    trainer.perform_actual_validation(args.npz)
    checksums = state_dict_checksums(unwrap(trainer.network).state_dict())
    print_whole_line(f"{tag}: epoch {trainer.current_epoch}, weights sha256 {format_checksums(checksums)}")


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``nnssl_train``: user errors (``DistributedSetupError`` among them) end in one line and exit 1, Ctrl-C in
    one line saying which checkpoints were kept and exit 130."""
    args = build_parser().parse_args(argv)
    check_flags(args)
    return run_user_command("nnssl_train", partial(train, args))


def train(args: argparse.Namespace) -> int:
    env = torchrun_environment()
    if env is not None:
        run_under_torchrun(args, env)
        return 0
    configure_threads(args.device)
    run_training(args.dataset_name_or_id, args.configuration, args.fold, args.tr, args.p, args.pretrained_weights,
                 args.num_gpus, args.npz, args.c, args.val, args.disable_checkpointing, args.val_best,
                 device=torch.device(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
