"""``nnssl_train``'s training: every rank's trainer inside torchrun's process group, or nnU-Net's ``run_training`` for a
plain launch. The command line (``nnssl.integration.train_cli``) imports this module only once it is time to train."""

import argparse
import sys
from typing import Union

import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint, run_training
from torch.backends import cudnn

from nnssl.integration.checkpoint import unwrap
from nnssl.integration.distributed import (TorchrunEnvironment, backend_for, configure_threads, per_rank_batch_size,
                                           place_trainer_on, torchrun_environment, torchrun_session)
from nnssl.integration.train_cli import parse_fold
from nnssl.integration.weights_checksum import format_checksums, state_dict_checksums


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
    if not args.val and hasattr(trainer, "resume_automatically"):  # nnssl trainers: restarts, requeues, preemption
        trainer.resume_automatically()
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


def run(args: argparse.Namespace) -> None:
    """Train as the parsed ``nnssl_train`` arguments say (``nnssl.integration.train_cli`` parses them). A
    ``DistributedSetupError`` is a user error: ``train_cli`` prints it as one line."""
    env = torchrun_environment()
    if env is not None:
        run_under_torchrun(args, env)
        return
    configure_threads(args.device)
    run_training(args.dataset_name_or_id, args.configuration, args.fold, args.tr, args.p, args.pretrained_weights,
                 args.num_gpus, args.npz, args.c, args.val, args.disable_checkpointing, args.val_best,
                 device=torch.device(args.device))
