"""Refusing a fold the dataset cannot provide, before nnU-Net's split fails with scikit-learn's traceback.

nnU-Net creates a 5-fold cross-validation (``splits_final.json``) the first time a numbered fold is trained; with
fewer than five cases scikit-learn stops with "n_splits=5 greater than n_samples". A small pretraining dataset
belongs in fold ``all`` anyway (pretraining validates on held-out patches of the same cases).
"""

import os
from typing import Sequence, Union

from nnssl.errors import UserError

NNUNET_NUM_FOLDS = 5  # the split nnU-Net's do_split creates


class FoldError(UserError):
    """The requested fold cannot be trained on this dataset."""


def check_fold_has_cases(fold: Union[int, str], num_cases: int, dataset_name: str, splits_file: str) -> None:
    """Refuse a numbered fold of a dataset with fewer cases than nnU-Net's 5-fold split needs (unless the user wrote
    ``splits_final.json``, which nnU-Net then uses as it is)."""
    if fold == "all" or os.path.isfile(splits_file) or num_cases >= NNUNET_NUM_FOLDS:
        return
    raise FoldError(f"{dataset_name} has {num_cases} case(s), too few for fold {fold}: nnU-Net's "
                    f"{NNUNET_NUM_FOLDS}-fold cross-validation needs at least {NNUNET_NUM_FOLDS}. Train fold 'all' "
                    f"(pretraining uses every case), add cases, or write your own splits to {splits_file}.")


def check_fold_is_trainable(fold: Union[int, str], training_cases: Sequence[str], splits_file: str) -> None:
    """Refuse a fold whose split left no training case (a hand-written ``splits_final.json``, or nnU-Net's random
    80:20 split of a tiny dataset for a fold beyond the file's)."""
    if not training_cases:
        raise FoldError(f"Fold {fold} has no training cases (split from {splits_file}). Train fold 'all', or give "
                        f"the fold training cases in that file.")
