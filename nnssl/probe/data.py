"""The probe's data: a labeled dataset preprocessed by nnU-Net, split into training and held-out cases.

The split is explicit and printed: fold 0 of ``splits_final.json`` when the dataset has one (what nnU-Net trains),
otherwise the fold 0 nnU-Net would create (its seeded 5-fold split) when there are at least five cases, otherwise
the last case (sorted by name) is held out. Training patches come from nnU-Net's own ``nnUNetDataLoader`` (its
foreground oversampling, no augmentation); the held-out cases are read whole, on the preprocessed grid.
"""

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Tuple

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnssl.errors import UserError
from nnssl.integration.folds import NNUNET_NUM_FOLDS

CONFIGURATION = "3d_fullres"
FOREGROUND_OVERSAMPLING = 0.33  # nnU-Net's default


@dataclass
class Split:
    train: List[str]
    heldout: List[str]
    source: str

    def describe(self) -> str:
        return (f"{len(self.train)} training case(s), {len(self.heldout)} held out ({', '.join(self.heldout)}); "
                f"split: {self.source}")


def probe_split(identifiers: List[str], splits_file: str) -> Split:
    """Fold 0 of ``splits_file`` if it exists, else nnU-Net's seeded fold 0, else the last case held out."""
    identifiers = sorted(identifiers)
    if len(identifiers) < 2:
        raise UserError(f"The probe needs at least 2 labeled cases (one to train on, one held out); the "
                        f"preprocessed dataset has {len(identifiers)}.")
    if os.path.isfile(splits_file):
        with open(splits_file) as file:
            fold = json.load(file)[0]
        train, heldout = list(fold["train"]), list(fold["val"])
        source = f"fold 0 of {splits_file}"
    elif len(identifiers) >= NNUNET_NUM_FOLDS:
        fold = generate_crossval_split(identifiers, seed=12345, n_splits=NNUNET_NUM_FOLDS)[0]
        train, heldout = list(fold["train"]), list(fold["val"])
        source = "fold 0 of nnU-Net's seeded 5-fold split (no splits_final.json)"
    else:
        train, heldout = identifiers[:-1], identifiers[-1:]
        source = f"last case held out ({len(identifiers)} cases, fewer than {NNUNET_NUM_FOLDS})"
    if not train or not heldout:
        raise UserError(f"The probe split ({source}) leaves {len(train)} training and {len(heldout)} held-out "
                        f"cases; both must be at least 1.")
    return Split(train, heldout, source)


@dataclass
class ProbeData:
    """A preprocessed labeled dataset: its plans configuration, label manager, split and case reader."""

    folder: str
    configuration: ConfigurationManager
    label_manager: LabelManager
    split: Split
    num_input_channels: int

    @classmethod
    def from_preprocessed(cls, dataset_folder: str, plans_name: str) -> "ProbeData":
        plans_file = os.path.join(dataset_folder, f"{plans_name}.json")
        with open(os.path.join(dataset_folder, "dataset.json")) as file:
            dataset_json = json.load(file)
        plans = PlansManager(plans_file)
        configuration = plans.get_configuration(CONFIGURATION)
        label_manager = plans.get_label_manager(dataset_json)
        if label_manager.has_regions:
            raise UserError(f"{dataset_folder}: the probe scores labels, not regions (dataset.json defines "
                            f"regions); probe a label-based dataset.")
        folder = os.path.join(dataset_folder, configuration.data_identifier)
        identifiers = infer_dataset_class(folder).get_identifiers(folder) if os.path.isdir(folder) else []
        split = probe_split(identifiers, os.path.join(dataset_folder, "splits_final.json"))
        return cls(folder, configuration, label_manager, split, len(dataset_json["channel_names"]))

    @property
    def dataset_name(self) -> str:
        return os.path.basename(os.path.dirname(self.folder))

    @property
    def patch_size(self) -> Tuple[int, ...]:
        return tuple(int(p) for p in self.configuration.patch_size)

    def dataset(self, identifiers: List[str]):
        return infer_dataset_class(self.folder)(self.folder, identifiers)

    def training_batches(self, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(image, target) patches of the training cases; drawn from numpy's global stream (the caller seeds it)."""
        loader = nnUNetDataLoader(self.dataset(self.split.train), batch_size, self.patch_size, self.patch_size,
                                  self.label_manager, oversample_foreground_percent=FOREGROUND_OVERSAMPLING)
        while True:
            batch = loader.generate_train_batch()
            target = batch["target"].long()
            target[target < 0] = 0  # nnU-Net's padding label; its training transforms map it to background too
            yield batch["data"], target

    def heldout_cases(self) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
        """(identifier, image (C, X, Y, Z), labels (X, Y, Z)) of each held-out case, as preprocessed."""
        dataset = self.dataset(self.split.heldout)
        for identifier in self.split.heldout:
            data, seg, _, _ = dataset.load_case(identifier)
            labels = np.asarray(seg[0]).astype(np.int16)
            labels[labels < 0] = 0
            yield identifier, np.asarray(data, dtype=np.float32), labels


def prepared_probe_data(dataset_id: int, plans_name: str, checkpoint_path: str, checkpoint: dict,
                        say: Callable[[str], None]) -> ProbeData:
    """The labeled dataset ``dataset_id`` preprocessed with ``plans_name``; planned and preprocessed for the
    checkpoint first (``nnssl_prepare_finetune``'s API) when those plans or their data do not exist yet."""
    from nnssl.finetuning.transfer import check_same_family
    from nnssl.plans.prepare_finetune import check_labeled, prepare_finetune, require_adaptation_plan

    adaptation_plan = require_adaptation_plan(checkpoint, checkpoint_path)
    dataset_folder = os.path.join(os.environ.get("nnUNet_preprocessed") or "", check_labeled(dataset_id))
    plans_file = os.path.join(dataset_folder, f"{plans_name}.json")
    if not os.path.isfile(plans_file) or not os.path.isdir(os.path.join(dataset_folder, data_identifier(plans_file))):
        say(f"{plans_name} of dataset {dataset_id} not prepared yet: planning and preprocessing it for the checkpoint "
            f"(nnssl_prepare_finetune -d {dataset_id} -c {checkpoint_path} -p {plans_name})")
        prepare_finetune(dataset_id, checkpoint_path, plans_name, checkpoint=checkpoint)
    data = ProbeData.from_preprocessed(dataset_folder, plans_name)
    check_same_family(adaptation_plan, data.configuration.network_arch_class_name, plans_name, checkpoint_path)
    return data


def data_identifier(plans_file: str) -> str:
    with open(plans_file) as file:
        return json.load(file)["configurations"][CONFIGURATION]["data_identifier"]
