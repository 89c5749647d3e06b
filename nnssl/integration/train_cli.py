"""``nnssl_train``'s command line: nnUNetv2_train's arguments, parsed without importing torch or nnU-Net, so that
``--help`` and argument errors answer at once; training itself is ``nnssl.integration.train.run``."""

import argparse
import sys
from typing import List, Optional, Union

from nnssl.integration.user_errors import run_user_command

DESCRIPTION = """\
nnUNetv2_train that torchrun can launch, on any number of nodes, GPUs or CPU processes:

  torchrun --nnodes N --nproc_per_node G --no-python nnssl_train DATASET 3d_fullres all -tr S3DPretrainTrainer -p nnsslPlans

Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) every process joins the process group
(NCCL with -device cuda, gloo with -device cpu), trains on cuda:<LOCAL_RANK> or the CPU with plans batch / world size
samples, and runs nnU-Net's trainer lifecycle (output folders, --c, --val, -pretrained_weights as nnUNetv2_train); at
the end every rank prints a checksum line of its weights. Without torchrun's environment the arguments go unchanged
to nnU-Net's run_training: exactly nnUNetv2_train."""


def build_parser() -> argparse.ArgumentParser:
    """nnUNetv2_train's arguments (names, defaults and meaning unchanged)."""
    parser = argparse.ArgumentParser(prog="nnssl_train", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_name_or_id", help="dataset name or ID to train with")
    parser.add_argument("configuration", help="configuration to train, e.g. 3d_fullres")
    parser.add_argument("fold", help="fold of the 5-fold cross-validation (0-4) or 'all'")
    parser.add_argument("-tr", default="nnUNetTrainer", metavar="TRAINER",
                        help="trainer class (default: %(default)s)")
    parser.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier (default: %(default)s)")
    parser.add_argument("-pretrained_weights", default=None, metavar="CHECKPOINT",
                        help="nnU-Net checkpoint to initialise the network from (only when training starts)")
    parser.add_argument("-num_gpus", type=int, default=1, metavar="N",
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


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``nnssl_train``: user errors (``DistributedSetupError`` among them) end in one line and exit 1, Ctrl-C in
    one line saying which checkpoints were kept and exit 130."""
    args = build_parser().parse_args(argv)
    check_flags(args)
    parse_fold(args.fold)

    def train() -> int:
        from nnssl.integration.train import run

        run(args)
        return 0

    return run_user_command("nnssl_train", train)


if __name__ == "__main__":
    sys.exit(main())
