"""``nnssl_probe``: frozen-encoder segmentation probe of a pretraining checkpoint, against a random encoder."""

import argparse
import json
import os
import sys
from dataclasses import asdict
from functools import partial
from typing import List, Optional

from nnssl.errors import UserError
from nnssl.integration.user_errors import run_user_command
from nnssl.probe.settings import ProbeSettings

DEFAULTS = ProbeSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnssl_probe",
        description="Is pretraining working? Trains a light decoder on the frozen stem+encoder of CHECKPOINT for a "
                    "fixed, seeded budget on a labeled nnU-Net dataset, scores Dice on held-out cases, and does the "
                    "same with a randomly initialised encoder of the same architecture (the floor). The dataset is "
                    "planned and preprocessed for the checkpoint first (as nnssl_prepare_finetune) unless plans "
                    "PLANS_NAME exist.")
    parser.add_argument("-d", type=int, required=True, metavar="ID", help="[REQUIRED] dataset ID of a labeled dataset")
    parser.add_argument("-c", "--checkpoint", required=True, metavar="CHECKPOINT",
                        help="[REQUIRED] pretraining checkpoint (network_weights + nnssl_adaptation_plan)")
    parser.add_argument("-p", "--plans_name", default="nnsslFinetunePlans", metavar="PLANS_NAME",
                        help="plans of the labeled dataset (default: %(default)s, nnssl_prepare_finetune's)")
    parser.add_argument("-device", default="cuda", choices=["cpu", "cuda"],
                        help="device to run on (default: %(default)s, as nnUNetv2_train)")
    parser.add_argument("-i", "--iterations", type=int, default=DEFAULTS.iterations, metavar="N",
                        help="head updates per arm (default: %(default)s)")
    parser.add_argument("-b", "--batch_size", type=int, default=DEFAULTS.batch_size, metavar="N",
                        help="patches per update (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULTS.learning_rate, metavar="LR",
                        help="AdamW learning rate of the head (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, metavar="N",
                        help="seed of the network initialisation, head and patch sampling (default: %(default)s)")
    parser.add_argument("-o", "--output", default=None, metavar="JSON",
                        help="where to write every number (default: CHECKPOINT's folder, "
                             "probe_<checkpoint>_<dataset>.json)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.batch_size < 1 or args.lr <= 0 or args.seed < 0:
        parser.error("-i and -b must be at least 1, --lr positive and --seed at least 0")
    return run_user_command("nnssl_probe", partial(run, args))


def probe_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("-device cuda: no CUDA device is available here; run with -device cpu.")
    return torch.device(name)


def result_lines(result) -> List[str]:
    return [f"pretrained encoder Dice: {result.pretrained.dice:.4f}",
            f"random encoder Dice:     {result.random.dice:.4f}",
            f"difference pretrained - random: {result.difference:+.4f}",
            f"ratio pretrained/random {result.ratio:.4f}" if result.ratio is not None else
            "ratio pretrained/random n/a (the random encoder's Dice is 0)"]


def default_output(checkpoint: str, dataset_name: str) -> str:
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"probe_{stem}_{dataset_name}.json")


def run(args: argparse.Namespace) -> int:
    from nnssl.finetuning.transfer import load_pretrained_checkpoint
    from nnssl.probe.data import prepared_probe_data
    from nnssl.probe.run import run_probe

    device = probe_device(args.device)
    checkpoint = load_pretrained_checkpoint(args.checkpoint)
    data = prepared_probe_data(args.d, args.plans_name, args.checkpoint, checkpoint, print)
    settings = ProbeSettings(args.iterations, args.batch_size, args.lr, args.seed)
    dataset_name = data.dataset_name
    print(f"nnssl_probe: {args.checkpoint} ({checkpoint.get('trainer_name', 'unknown trainer')}) on {dataset_name}, "
          f"plans {args.plans_name}, patch {list(data.patch_size)}, {device.type}")
    print(f"held-out cases: {data.split.describe()}")
    print(f"budget per arm: {settings.describe()}; Dice of the held-out cases on the preprocessed grid "
          f"(non-overlapping tiles)")
    result = run_probe(data, checkpoint["network_weights"], checkpoint["nnssl_adaptation_plan"], settings, device,
                       os.path.basename(args.checkpoint), print)
    output = args.output or default_output(args.checkpoint, dataset_name)
    record = {"checkpoint": os.path.abspath(args.checkpoint), "dataset": dataset_name, "plans": args.plans_name,
              "device": device.type, "split": {"train": data.split.train, "heldout": data.split.heldout,
                                               "source": data.split.source},
              "settings": asdict(settings), "pretrained": asdict(result.pretrained), "random": asdict(result.random),
              "difference": result.difference, "ratio": result.ratio, "transfer": result.transfer}
    with open(output, "w") as file:
        json.dump(record, file, indent=2)
    print()
    print("\n".join(result_lines(result)))
    print(f"every number: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
