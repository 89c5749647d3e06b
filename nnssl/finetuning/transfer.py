"""Loading pretrained stem/encoder (optionally decoder) weights into a downstream dna network.

Rules (S3D fine-tuning; reference behaviour in nnssl-behaviour.md §3.3):
* weights come from the checkpoint's ``network_weights``; wrapper prefixes (``module.``, ``_orig_mod.``) are
  stripped, and nnU-Net's duplicate ``decoder.encoder.*`` keys are ignored;
* dna registers every conv/norm twice (``.conv``/``.norm`` and ``.all_modules.0/1``); checkpoints written by
  nnssl's Spark trainer hold untrained tensors under the first alias, so the ``all_modules`` tensors always win;
* the adaptation plan's prefixes (``key_to_stem``, ``key_to_encoder``) say where stem and encoder are in the
  checkpoint; they are renamed to the network's own (``reference_layouts``: e.g. the reference's contrastive Primus
  keeps its encoder at ``encoder.eva``), every other tensor must be a known pretraining-only part or is refused;
* a one-channel pretrained stem is replicated over the downstream input channels and divided by their number, and
  a Primus's learned positional embedding pretrained on another patch is resampled to the downstream token grid;
* strict on both sides: a transferred tensor that is missing, of the wrong shape, or present in the checkpoint but
  not in the network (e.g. an encoder with more blocks at the same widths) is reported in ONE error listing every
  offending key and its shapes.
"""

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnssl.architectures import is_primus, transferable_prefixes
from nnssl.errors import PretrainedWeightsError
from nnssl.finetuning.adaptation_plan import (KEYS_TO_IN_PROJ, is_primus_plan, nnunet_architecture,
                                              pretrain_configuration)
from nnssl.finetuning.reference_layouts import (dropped_summary, map_onto_network, resample_positional_embedding,
                                                token_grid)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
ALIASES = ((".all_modules.0.", ".conv."), (".all_modules.1.", ".norm."))
DECODER_PREFIX = "decoder."
NOT_TRANSFERRED_DECODER_PREFIXES = ("decoder.encoder.", "decoder.seg_layers.")


def load_pretrained_checkpoint(path: str) -> dict:
    """Read a checkpoint onto the CPU (whatever device saved it) and check it carries ``network_weights``."""
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f"Pretrained checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise PretrainedWeightsError(f"Pretrained checkpoint {path} cannot be read by torch.load: {error}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise PretrainedWeightsError(f"{path} is not an nnU-Net/nnssl checkpoint: it has no 'network_weights' dict.")
    return checkpoint


def canonical_state_dict(network_weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip wrapper prefixes and make every ``.conv``/``.norm`` alias equal to its ``all_modules`` twin."""
    state = {}
    for key, value in network_weights.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    for key in list(state):
        for trained, stale in ALIASES:
            if trained in key:
                state[key.replace(trained, stale)] = state[key]
    return state


def part_of(key: str, prefixes: Dict[str, str]) -> str:
    """Which transfer part (``stem``, ``encoder``, ``decoder``) a state-dict key belongs to, or ``""``."""
    for part, prefix in prefixes.items():
        if part == "decoder":
            if key.startswith(DECODER_PREFIX) and not key.startswith(NOT_TRANSFERRED_DECODER_PREFIXES):
                return part
        elif key.startswith(prefix + "."):
            return part
    return ""


@dataclass
class TransferReport:
    """What was loaded per part, what was adapted, and what was skipped with the reason."""

    loaded: Dict[str, int] = field(default_factory=dict)
    adapted: List[str] = field(default_factory=list)
    skipped: Dict[str, Tuple[int, str]] = field(default_factory=dict)
    layout: str = ""
    renamed: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        lines = [f"checkpoint layout: {self.layout}"] if self.layout else []
        lines += [f"renamed {r}" for r in self.renamed]
        lines += [f"loaded {n} tensors into the {part}" for part, n in self.loaded.items()]
        lines += [f"adapted {a}" for a in self.adapted]
        lines += [f"skipped {n} checkpoint tensors: {what} ({why})" for what, (n, why) in self.skipped.items()]
        return lines


def replicate_input_channels(weight: torch.Tensor, num_channels: int) -> torch.Tensor:
    """A stem conv weight pretrained on C channels, repeated to ``num_channels`` and divided by the repetition.

    The response to identical images in every channel then equals the pretrained response.
    """
    pretrained_channels = weight.shape[1]
    if num_channels % pretrained_channels:
        raise PretrainedWeightsError(f"Cannot replicate a stem pretrained on {pretrained_channels} channels to "
                                     f"{num_channels} input channels.")
    repeats = num_channels // pretrained_channels
    return weight.repeat(1, repeats, *([1] * (weight.dim() - 2))) / repeats


def transfer_pretrained_weights(network: nn.Module, network_weights: Dict[str, torch.Tensor],
                                adaptation_plan: dict, parts: Sequence[str] = ("stem", "encoder"),
                                source: str = "checkpoint",
                                patch_size: Optional[Sequence[int]] = None) -> TransferReport:
    """Copy the selected parts of a pretrained state dict into ``network`` (in place) and report what happened.

    ``patch_size`` is the network's input patch; a Primus needs it when its positional embedding must be resampled.
    """
    stem, encoder = transferable_prefixes(network)
    mapped = map_onto_network(canonical_state_dict(network_weights), adaptation_plan,
                              {"stem": stem, "encoder": encoder}, source)
    prefixes = {"stem": stem, "encoder": encoder, "decoder": DECODER_PREFIX}
    prefixes = {part: prefixes[part] for part in parts}
    in_proj = {k + ".weight" for k in (getattr(network, "keys_to_in_proj", None) or KEYS_TO_IN_PROJ)}
    lpe = getattr(network, "key_to_lpe", None)
    pretrained = mapped.state
    target = network.state_dict()
    report = TransferReport(layout=mapped.layout, renamed=mapped.renamed)
    new_values, problems, loaded_storages = {}, [], {}
    for key, tensor in target.items():
        part = part_of(key, prefixes)
        if not part:
            continue
        value = pretrained.get(key)
        if value is None:
            problems.append(f"  {key}: missing in the {source} (network expects {tuple(tensor.shape)})")
            continue
        if key in in_proj and value.shape != tensor.shape and value.shape[0] == tensor.shape[0] \
                and value.shape[2:] == tensor.shape[2:]:
            value = replicate_input_channels(value, tensor.shape[1])
            report.adapted.append(f"{key}: replicated {tuple(pretrained[key].shape)} -> {tuple(tensor.shape)} "
                                  f"over the input channels (divided by {tensor.shape[1] // pretrained[key].shape[1]})")
        resampled = resampled_lpe(value, tensor, adaptation_plan, pretrained, in_proj, patch_size, source) \
            if key == lpe and value.shape != tensor.shape else None
        if resampled is not None:
            value, (source_grid, target_grid) = resampled
            report.adapted.append(f"{key}: resampled {tuple(pretrained[key].shape)} -> {tuple(tensor.shape)} "
                                  f"(pretraining patch {list(pretrain_patch_size(adaptation_plan))} -> downstream "
                                  f"patch {list(patch_size)}, token grid {list(source_grid)} -> {list(target_grid)}, "
                                  f"trilinear)")
        if value.shape != tensor.shape:
            problems.append(f"  {key}: {source} {tuple(value.shape)} vs network {tuple(tensor.shape)}")
            continue
        new_values[key] = value.to(dtype=tensor.dtype)
        loaded_storages.setdefault(part, set()).add(tensor.data_ptr())  # dna aliases share one tensor
    report.loaded = {part: len(storages) for part, storages in loaded_storages.items()}
    for key, value in pretrained.items():
        extra_part = part_of(key, prefixes) if key not in target else ""
        if extra_part:
            problems.append(f"  {key}: in the {source} {tuple(value.shape)} but not in the network (a deeper or "
                            f"different {extra_part})")
    if problems:
        raise PretrainedWeightsError(f"The pretrained weights do not match the network ({len(problems)} "
                                     f"tensors of {', '.join(parts)}):\n" + "\n".join(problems))
    missing_parts = [p for p in parts if not report.loaded.get(p)]
    if missing_parts:
        raise PretrainedWeightsError(f"The network has no tensors under {missing_parts} "
                                     f"(prefixes {[prefixes[p] for p in missing_parts]}).")
    network.load_state_dict(new_values, strict=False)
    report.skipped = dropped_summary([key for key in pretrained if not part_of(key, prefixes)])
    return report


def pretrain_patch_size(adaptation_plan: dict) -> Optional[List[int]]:
    """The patch the checkpoint was pretrained on: the reference records the crop size of its contrastive methods in
    the pretraining configuration, and its downstream code lets a ``pretrain_patch_size`` entry override that."""
    if adaptation_plan.get("pretrain_patch_size"):
        return list(adaptation_plan["pretrain_patch_size"])
    try:
        return list(pretrain_configuration(adaptation_plan)["patch_size"])
    except (KeyError, TypeError, StopIteration):
        return None


def resampled_lpe(value: torch.Tensor, tensor: torch.Tensor, adaptation_plan: dict, pretrained: dict,
                  in_proj: set, patch_size: Optional[Sequence[int]], source: str
                  ) -> Optional[Tuple[torch.Tensor, Tuple[Tuple[int, ...], Tuple[int, ...]]]]:
    """The checkpoint's positional embedding on the network's token grid with (pretraining grid, network grid),
    or None (then reported as a shape mismatch) when the grids cannot be told from the plan and the patch
    embedding."""
    source_patch = pretrain_patch_size(adaptation_plan)
    kernel = next((pretrained[k].shape[2:] for k in in_proj if k in pretrained), None)
    if source_patch is None or patch_size is None or kernel is None or value.shape[-1] != tensor.shape[-1]:
        return None
    source_grid, target_grid = token_grid(source_patch, kernel), token_grid(patch_size, kernel)
    if math.prod(source_grid) != value.shape[1] or math.prod(target_grid) != tensor.shape[1]:
        raise PretrainedWeightsError(
            f"{source}: the positional embedding {tuple(value.shape)} does not fit the pretraining patch "
            f"{source_patch} (token grid {list(source_grid)}), so it cannot be resampled to the network's "
            f"{tuple(tensor.shape)}. Check pretrain_plan's patch_size in the checkpoint's nnssl_adaptation_plan.")
    return resample_positional_embedding(value, source_grid, target_grid), (source_grid, target_grid)


def check_weights_match_adaptation_plan(checkpoint: dict, source: str) -> TransferReport:
    """Load the checkpoint's stem and encoder into the network its own adaptation plan describes (strictly, as
    fine-tuning will): a checkpoint whose weights and plan disagree fails at planning time, not after preprocessing.
    """
    from nnssl.architectures import network_from_plans

    plan = checkpoint["nnssl_adaptation_plan"]
    try:
        architecture = nnunet_architecture(plan)
        network = network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"],
                                     int(plan.get("pretrain_num_input_channels") or 1), 1, deep_supervision=False,
                                     source="its nnssl_adaptation_plan")
    except ValueError as error:
        raise PretrainedWeightsError(f"{source}: {error}") from None
    try:
        return transfer_pretrained_weights(network, checkpoint["network_weights"], plan, source=source,
                                           patch_size=architecture["arch_kwargs"].get("input_shape"))
    except PretrainedWeightsError as error:
        raise PretrainedWeightsError(f"{source}: its weights do not match its own nnssl_adaptation_plan "
                                     f"(architecture_plans). {error}") from None


def check_same_family(adaptation_plan: dict, network_class_name: str, plans_name: str, path: str) -> None:
    """A Primus checkpoint needs Primus plans and a U-Net checkpoint U-Net plans (said before any key error)."""
    if "architecture_plans" not in adaptation_plan:
        return
    checkpoint_primus = is_primus_plan(adaptation_plan)
    if checkpoint_primus != is_primus(network_class_name):
        kind = "a Primus (transformer)" if checkpoint_primus else "a U-Net (CNN)"
        raise PretrainedWeightsError(
            f"{path} is {kind} checkpoint ({adaptation_plan['architecture_plans']['arch_class_name']}), but the "
            f"plans {plans_name} build {network_class_name.rsplit('.', 1)[-1]}. Plan the dataset for this "
            f"checkpoint with 'nnssl_prepare_finetune -d ID -c {path}' and train with its plans.")
