"""Dynamic adaptation: a pretrained ResEnc stem and encoder loaded into a U-Net planned for the downstream dataset.

The rules of nnU-Net master's ``DynamicPretrainedTrainer`` (its ``adapt_encoder_weights_for_architecture``):

* tensors are matched by name, so stage s and block b of the network take stage s and block b of the checkpoint:
  the shallow stages line up, pretrained stages (or blocks) deeper than the network's are not used, and network
  stages (or blocks) deeper than the checkpoint's stay freshly initialised;
* a conv kernel of extent 1 where the pretrained one is larger (3x3x3 -> 1x3x3 in the in-plane stages of
  anisotropic data) is averaged over that axis; every other kernel change leaves the tensor fresh (master stops
  with NotImplementedError there). Each conv is followed by an instance norm, so averaging and summing are the same;
* a stem pretrained on fewer input channels is replicated over the downstream channels (``replicate_input_channels``);
* every other tensor whose shape differs (another width) stays fresh; strides own no weights and need nothing.

Unlike master, every decision is reported (one row per stem / encoder stage, plus the fresh decoder), pretrained
tensors left unused are listed with the reason, and a network into which no encoder tensor loads is refused: a
silent from-scratch run must not pass for fine-tuning.
"""

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from nnssl.architectures import transferable_prefixes
from nnssl.errors import PretrainedWeightsError
from nnssl.finetuning.adaptation_plan import KEYS_TO_IN_PROJ
from nnssl.finetuning.reference_layouts import dropped_summary, map_onto_network
from nnssl.finetuning.transfer import canonical_state_dict, replicate_input_channels

FATES = ("loaded", "adapted", "fresh", "unused")
DECODER_ROW = "decoder + heads"


@dataclass
class DynamicTransferReport:
    """Per row (stem, encoder stages, decoder): tensor counts per fate; adapted tensors; fresh and unused groups."""

    counts: Dict[str, Dict[str, int]] = field(default_factory=dict)
    adapted: List[str] = field(default_factory=list)
    fresh: Dict[str, Tuple[int, str]] = field(default_factory=dict)
    unused: Dict[str, Tuple[int, str]] = field(default_factory=dict)
    skipped: Dict[str, Tuple[int, str]] = field(default_factory=dict)
    layout: str = ""

    def add(self, row: str, fate: str) -> None:
        self.counts.setdefault(row, dict.fromkeys(FATES, 0))[fate] += 1

    def total(self, fate: str, rows: Optional[List[str]] = None) -> int:
        return sum(c[fate] for r, c in self.counts.items() if rows is None or r in rows)

    def table(self) -> List[str]:
        lines = [f"{'':18}{'loaded':>8}{'adapted':>9}{'fresh':>7}{'unused':>8}"]
        rows = sorted(self.counts.items(), key=lambda item: row_order(item[0]))
        for row, counts in [*rows, ("total", {f: self.total(f) for f in FATES})]:
            lines.append(f"{row:18}" + "".join(f"{counts[f]:>{w}}" for f, w in zip(FATES, (8, 9, 7, 8))))
        return lines

    def lines(self) -> List[str]:
        lines = [f"checkpoint layout: {self.layout}"] if self.layout else []
        lines += ["dynamic adaptation (tensors; 'unused': pretrained stem/encoder tensors that fit nowhere):"]
        lines += ["  " + line for line in self.table()]
        lines += [f"adapted {a}" for a in self.adapted]
        lines += [f"fresh {n} tensors: {what} ({why})" for what, (n, why) in self.fresh.items()]
        lines += [f"unused {n} pretrained tensors: {what} ({why})" for what, (n, why) in self.unused.items()]
        lines += [f"skipped {n} checkpoint tensors: {what} ({why})" for what, (n, why) in self.skipped.items()]
        return lines


def row_order(row: str) -> Tuple[int, int]:
    """Stem, encoder stages by depth, then the decoder."""
    if row.startswith("encoder stage "):
        return 1, int(row.rsplit(" ", 1)[1])
    return (0, 0) if row == "stem" else (2, 0)


def stage_and_block(key: str, encoder: str) -> Tuple[Optional[int], Optional[int]]:
    """(stage, block) of an encoder key such as ``encoder.stages.2.blocks.1.conv1.conv.weight``, else Nones."""
    match = re.match(re.escape(encoder) + r"\.(\d+)\.(?:blocks\.(\d+)\.)?", key)
    if not match:
        return None, None
    return int(match.group(1)), None if match.group(2) is None else int(match.group(2))


def row_of(key: str, stem: str, encoder: str) -> str:
    if key.startswith(stem + "."):
        return "stem"
    stage, _ = stage_and_block(key, encoder)
    return DECODER_ROW if stage is None else f"encoder stage {stage}"


def group_of(key: str, encoder: str) -> str:
    """The block (or stage, or module) a key belongs to: fresh and unused tensors are listed per group."""
    stage, block = stage_and_block(key, encoder)
    if stage is None:
        return key.rsplit(".", 1)[0] + ".*"
    return f"{encoder}.{stage}" + ("" if block is None else f".blocks.{block}") + ".*"


def depth(keys, encoder: str) -> Tuple[int, Dict[int, int]]:
    """Number of encoder stages and blocks per stage among ``keys``."""
    blocks: Dict[int, int] = {}
    for key in keys:
        stage, block = stage_and_block(key, encoder)
        if stage is not None:
            blocks[stage] = max(blocks.get(stage, 0), -1 if block is None else block + 1)
    return len(blocks), blocks


def absence(key: str, encoder: str, other_depth: Tuple[int, Dict[int, int]], other: str) -> str:
    """Why ``key`` has no twin on the ``other`` side (the checkpoint or the network)."""
    n_stages, blocks = other_depth
    stage, block = stage_and_block(key, encoder)
    if stage is not None and stage >= n_stages:
        return f"stage {stage} is deeper than the {other}'s {n_stages} stages"
    if block is not None and block >= blocks.get(stage, 0):
        return f"block {block} is deeper than the {other}'s {blocks.get(stage, 0)} blocks in stage {stage}"
    return f"not in the {other}"


def fitted(value: torch.Tensor, tensor: torch.Tensor, in_proj: bool) -> Tuple[Optional[torch.Tensor], str]:
    """The pretrained ``value`` made to fit ``tensor``'s shape (channel replication, kernel averaging) and what was
    done, or None and why not."""
    shape, notes = tuple(value.shape), []
    conv = value.dim() == tensor.dim() >= 3
    if in_proj and conv and value.shape[0] == tensor.shape[0] and value.shape[1] != tensor.shape[1] \
            and tensor.shape[1] % value.shape[1] == 0:
        value = replicate_input_channels(value, tensor.shape[1])
        notes.append(f"replicated over {tensor.shape[1]} input channels")
    if conv and value.shape[:2] == tensor.shape[:2] and value.shape[2:] != tensor.shape[2:] and \
            all(t in (k, 1) for k, t in zip(value.shape[2:], tensor.shape[2:])):
        axes = [i for i, (k, t) in enumerate(zip(value.shape[2:], tensor.shape[2:])) if k != t]
        value = value.mean(dim=[a + 2 for a in axes], keepdim=True)
        notes.append(f"kernel {tuple(shape[2:])} -> {tuple(tensor.shape[2:])} averaged over axis "
                     f"{', '.join(map(str, axes))}")
    if value.shape != tensor.shape:
        return None, f"shape {shape} in the checkpoint vs {tuple(tensor.shape)} in the network"
    return value, "; ".join(notes)


def count(groups: Dict[str, Tuple[int, str]], group: str, reason: str) -> None:
    """Add one tensor to ``group``; a group's reason is its first tensor's (a block fails for one reason)."""
    n, first = groups.get(group, (0, reason))
    groups[group] = (n + 1, first)


def unique_keys(state: Dict[str, torch.Tensor]) -> List[str]:
    """One key per tensor: dna registers every conv/norm twice (``.conv``/``.all_modules.0``), keep the first."""
    seen, keys = set(), []
    for key, value in state.items():
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            keys.append(key)
    return keys


def dynamic_transfer(network: nn.Module, network_weights: Dict[str, torch.Tensor], adaptation_plan: dict,
                     source: str = "checkpoint") -> DynamicTransferReport:
    """Load every pretrained stem/encoder tensor that fits ``network`` (in place) and report each tensor's fate."""
    stem, encoder = transferable_prefixes(network)
    mapped = map_onto_network(canonical_state_dict(network_weights), adaptation_plan,
                              {"stem": stem, "encoder": encoder}, source)
    transferable = (stem + ".", encoder + ".")
    pretrained = {k: v for k, v in mapped.state.items() if k.startswith(transferable)}
    pretrained_keys = unique_keys(pretrained)
    target = network.state_dict()
    target_keys = unique_keys(target)
    in_proj = {k + ".weight" for k in (getattr(network, "keys_to_in_proj", None) or KEYS_TO_IN_PROJ)}
    pretrained_depth, network_depth = depth(pretrained_keys, encoder), depth(target_keys, encoder)
    report = DynamicTransferReport(layout=mapped.layout)
    new_values, used = {}, set()
    for key in target_keys:
        row = row_of(key, stem, encoder)
        if row == DECODER_ROW:
            report.add(row, "fresh")
            continue
        value = pretrained.get(key)
        if value is None:
            report.add(row, "fresh")
            count(report.fresh, group_of(key, encoder), absence(key, encoder, pretrained_depth, "checkpoint"))
            continue
        value, note = fitted(value, target[key], key in in_proj)
        if value is None:
            report.add(row, "fresh")
            count(report.fresh, group_of(key, encoder), note)
            continue
        used.add(key)
        new_values[key] = value.to(dtype=target[key].dtype)
        report.add(row, "adapted" if note else "loaded")
        if note:
            report.adapted.append(f"{key}: {note}")
    for key in pretrained_keys:
        if key not in used:
            reason = absence(key, encoder, network_depth, "network") if key not in target else "did not fit"
            report.add(row_of(key, stem, encoder), "unused")
            count(report.unused, group_of(key, encoder), reason)
    encoder_rows = [row for row in report.counts if row.startswith("encoder stage")]
    if not report.total("loaded", encoder_rows) + report.total("adapted", encoder_rows):
        raise PretrainedWeightsError(
            f"{source}: not one pretrained encoder tensor fits the network planned for this dataset, so fine-tuning "
            f"would train from scratch:\n  " + "\n  ".join(report.lines()) + "\nPlan with the checkpoint's own "
            f"architecture (nnssl_prepare_finetune without --architecture dynamic), or use a checkpoint whose widths "
            f"match nnU-Net's ResEnc plans.")
    network.load_state_dict(new_values, strict=False)
    report.skipped = dropped_summary([key for key in unique_keys(mapped.state) if not key.startswith(transferable)])
    return report
