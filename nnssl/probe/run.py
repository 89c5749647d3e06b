"""One probe arm: build the plans' network (seeded), load the checkpoint's stem and encoder (or keep the random ones:
the floor), train the light head on the frozen encoder for a fixed seeded budget, score Dice on the held-out cases.

Both arms of a probe use the same seed: the same random network before the pretrained tensors are loaded, the same
head initialisation, the same training patches in the same order; they differ only in the encoder's weights.
Held-out cases are predicted with non-overlapping patch tiles (the volume zero-padded to whole tiles, no mirroring)
and scored on nnU-Net's preprocessed grid, not resampled back to the raw images: a relative measure, cheap and the
same for every arm, not nnU-Net's validation Dice.
"""

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import product
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnssl.architectures import network_from_configuration
from nnssl.finetuning.transfer import TransferReport, transfer_pretrained_weights
from nnssl.integration.seeding import seed_process
from nnssl.probe.data import ProbeData
from nnssl.probe.model import FrozenEncoderProbe
from nnssl.probe.settings import ProbeSettings


@dataclass
class ArmResult:
    dice: float
    per_case: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def probe_network(data: ProbeData, seed: int) -> nn.Module:
    """The plans' network, initialised from ``seed`` (the random encoder of the floor)."""
    torch.manual_seed(seed)
    return network_from_configuration(data.configuration, data.num_input_channels,
                                      data.label_manager.num_segmentation_heads, deep_supervision=False)


def load_encoder(network: nn.Module, network_weights: Dict[str, torch.Tensor], adaptation_plan: dict,
                 data: ProbeData, source: str) -> TransferReport:
    """The stem and encoder a fine-tuning of these plans would load (same rules, same checks)."""
    return transfer_pretrained_weights(network, network_weights, adaptation_plan, ("stem", "encoder"), source=source,
                                       patch_size=data.patch_size)


def segmentation_loss(data: ProbeData) -> nn.Module:
    """nnU-Net's Dice + cross-entropy, as its trainer builds it without deep supervision."""
    return DC_and_CE_loss({"batch_dice": data.configuration.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
                          {}, weight_ce=1, weight_dice=1, ignore_label=data.label_manager.ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def run_arm(network: nn.Module, data: ProbeData, settings: ProbeSettings, device: torch.device) -> ArmResult:
    """Train the head on the frozen ``network`` and score the held-out cases. Seeds the global streams (the caller
    keeps them when it must, e.g. inside a pretraining run)."""
    start = time.perf_counter()
    seed_process(settings.seed)
    probe = FrozenEncoderProbe(network, data.label_manager.num_segmentation_heads).to(device)
    optimizer = torch.optim.AdamW(probe.head.parameters(), lr=settings.learning_rate)
    loss_function = segmentation_loss(data)
    batches = data.training_batches(settings.batch_size)
    probe.train()
    for _ in range(settings.iterations):
        image, target = next(batches)
        with autocast(device):
            loss = loss_function(probe(image.to(device)), target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    probe.eval()
    per_case = {identifier: case_dice(predict_tiled(probe, image, data.patch_size, device), labels, data)
                for identifier, image, labels in data.heldout_cases()}
    values = [v for v in per_case.values() if np.isfinite(v)]
    return ArmResult(float(np.mean(values)) if values else float("nan"), per_case, time.perf_counter() - start)


@torch.no_grad()
def predict_tiled(probe: nn.Module, image: np.ndarray, patch_size: Tuple[int, ...],
                  device: torch.device) -> np.ndarray:
    """Label map of a (C, X, Y, Z) volume from non-overlapping patch tiles (zero-padded to whole tiles)."""
    shape = image.shape[1:]
    padded_shape = [-(-s // p) * p for s, p in zip(shape, patch_size)]
    padded = np.zeros((image.shape[0], *padded_shape), dtype=np.float32)
    padded[(slice(None), *(slice(0, s) for s in shape))] = image
    labels = np.zeros(padded_shape, dtype=np.int16)
    for corner in product(*(range(0, s, p) for s, p in zip(padded_shape, patch_size))):
        tile = tuple(slice(c, c + p) for c, p in zip(corner, patch_size))
        with autocast(device):
            logits = probe(torch.from_numpy(padded[(slice(None), *tile)][None]).to(device))
        labels[tile] = logits[0].argmax(0).cpu().numpy()
    return labels[tuple(slice(0, s) for s in shape)]


def case_dice(prediction: np.ndarray, labels: np.ndarray, data: ProbeData) -> float:
    """Mean Dice over the foreground labels (a label absent from both is left out, as nnU-Net does); NaN if all are."""
    ignore = data.label_manager.ignore_label
    valid = labels != ignore if ignore is not None else np.ones(labels.shape, dtype=bool)
    values = []
    for label in data.label_manager.foreground_labels:
        predicted, reference = (prediction == label) & valid, (labels == label) & valid
        total = predicted.sum() + reference.sum()
        if total:
            values.append(2.0 * (predicted & reference).sum() / total)
    return float(np.mean(values)) if values else float("nan")


@dataclass
class ProbeResult:
    """Both arms of one probe and how they were obtained."""

    pretrained: ArmResult
    random: ArmResult
    settings: ProbeSettings
    split: str
    transfer: List[str]

    @property
    def difference(self) -> float:
        return self.pretrained.dice - self.random.dice

    @property
    def ratio(self) -> Optional[float]:
        """None when the random encoder segments nothing (Dice 0): no ratio, the difference says it all."""
        return self.pretrained.dice / self.random.dice if self.random.dice > 0 else None


def pretrained_arm(data: ProbeData, network_weights: Dict[str, torch.Tensor], adaptation_plan: dict,
                   settings: ProbeSettings, device: torch.device, source: str) -> Tuple[ArmResult, TransferReport]:
    network = probe_network(data, settings.seed)
    report = load_encoder(network, network_weights, adaptation_plan, data, source)
    return run_arm(network, data, settings, device), report


def random_arm(data: ProbeData, settings: ProbeSettings, device: torch.device) -> ArmResult:
    return run_arm(probe_network(data, settings.seed), data, settings, device)


def run_probe(data: ProbeData, network_weights: Dict[str, torch.Tensor], adaptation_plan: dict,
              settings: ProbeSettings, device: torch.device, source: str,
              say: Optional[Callable[[str], None]] = None) -> ProbeResult:
    """The pretrained arm, then the floor (same seed, same data, same budget)."""
    say = say or (lambda _line: None)
    pretrained, report = pretrained_arm(data, network_weights, adaptation_plan, settings, device, source)
    say(f"pretrained encoder: Dice {pretrained.dice:.4f} ({pretrained.seconds:.1f} s)")
    floor = random_arm(data, settings, device)
    say(f"random encoder:     Dice {floor.dice:.4f} ({floor.seconds:.1f} s)")
    return ProbeResult(pretrained, floor, settings, data.split.describe(), report.lines())
