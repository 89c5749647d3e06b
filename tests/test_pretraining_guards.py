"""The pretraining base trainer's guards, on a bare model: non-finite losses skip the update and stop training."""

import re
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch

from nnssl.methods.recipe import PRETRAIN_RECIPE
from nnssl.trainers.pretraining import NonFiniteLossError, nnsslPretrainTrainer


class Host:
    """Just what ``nnsslPretrainTrainer.train_step`` reads, around a one-layer model."""

    train_step = nnsslPretrainTrainer.train_step
    _clip_gradients = nnsslPretrainTrainer._clip_gradients
    _count_nonfinite_loss = nnsslPretrainTrainer._count_nonfinite_loss
    recipe = replace(PRETRAIN_RECIPE, max_nonfinite_losses_per_epoch=3)
    grad_scaler = None
    current_epoch = 7

    def __init__(self):
        self.network = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=0.1, momentum=0.9)
        self._nonfinite_losses_this_epoch = 0
        self.log = []
        self.poison = False

    def autocast(self):
        return nullcontext()

    def compute_loss(self, batch, train):
        loss = self.network(batch["data"]).pow(2).mean()
        return loss * float("nan") if self.poison else loss

    def print_to_log_file(self, message):
        self.log.append(message)


def test_nonfinite_losses_skip_the_update_and_stop_after_the_limit():
    host = Host()
    batch = {"data": torch.randn(2, 4)}
    before = [p.clone() for p in host.network.parameters()]
    host.train_step(batch)
    assert any(not torch.equal(a, b) for a, b in zip(before, host.network.parameters()))  # a normal step learns
    host.poison = True
    after_good_step = [p.clone() for p in host.network.parameters()]
    for _ in range(3):
        host.train_step(batch)
    assert host._nonfinite_losses_this_epoch == 3
    assert all(torch.equal(a, b) for a, b in zip(after_good_step, host.network.parameters()))  # no NaN update
    with pytest.raises(NonFiniteLossError, match="4 non-finite .* in epoch 7 \\(limit 3\\)"):
        host.train_step(batch)
    assert "training stopped" in host.log[-1]


def test_loss_region_excludes_anonymised_voxels_and_can_restrict_to_anatomy():
    from types import SimpleNamespace

    from nnssl.trainers.s3d import S3DPretrainTrainer

    region_map = torch.tensor([0, 1, 2, 1]).view(1, 1, 4, 1, 1)
    plain = SimpleNamespace(restrict_loss_to_anatomy=False, exclude_anonymised=False)
    assert S3DPretrainTrainer.loss_region(plain, region_map) is None
    anonymised = SimpleNamespace(restrict_loss_to_anatomy=False, exclude_anonymised=True)
    assert S3DPretrainTrainer.loss_region(anonymised, region_map).flatten().tolist() == [True, True, False, True]
    anatomy = SimpleNamespace(restrict_loss_to_anatomy=True, exclude_anonymised=True)
    assert S3DPretrainTrainer.loss_region(anatomy, region_map).flatten().tolist() == [False, True, False, True]


@pytest.mark.parametrize("change, message", [
    ({"precision": "fp8"}, "precision must be one of ('bf16', 'fp16'), not 'fp8'"),
    ({"peak_lr": 0.0}, "peak_lr must be positive"),
    ({"gradient_clip_norm": 0.0}, "gradient_clip_norm must be positive or None"),
    ({"num_epochs": 0}, "num_epochs must be at least 1"),
    ({"max_nonfinite_losses_per_epoch": -1}, "max_nonfinite_losses_per_epoch must be >= 0"),
    ({"optimizer": "adam"}, "optimizer must be one of ('sgd', 'adamw'), not 'adam'"),
    ({"decay": "step"}, "decay must be one of ('poly', 'cosine'), not 'step'"),
    ({"warmup_fraction": 1.0}, "warmup_fraction must lie in [0, 1), not 1.0"),
])
def test_invalid_pretraining_recipes_are_refused(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        replace(PRETRAIN_RECIPE, **change)
    assert replace(PRETRAIN_RECIPE, gradient_clip_norm=None).gradient_clip_norm is None  # no clipping is valid
