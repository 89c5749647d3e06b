"""Checkpoints of the reference framework (MIC-DKFZ/nnssl, the OpenMind releases) mapped onto the downstream network.

The reference saves the whole pretraining module as ``network_weights`` (DDP and ``torch.compile`` wrappers
stripped), so besides the stem and encoder a checkpoint holds whatever else its method trained, under the prefixes
of its pretraining architecture; the adaptation plan's ``key_to_stem`` / ``key_to_encoder`` say where the
transferable parts are. Per backbone the reference writes:

* ResEnc-L, every method: stem and encoder at ``encoder.stem`` / ``encoder.stages`` (the dna U-Net's own names);
  MAE, S3D, Models Genesis and VolumeFusion add the U-Net decoder, VoCo and SimCLR a ``projector`` (no decoder),
  SwinUNETR its rotation, contrastive and reconstruction heads (no decoder).
* Primus-M ("Eva" trainers): MAE, Models Genesis and VolumeFusion save the EVA MAE module itself, whose stem and
  encoder are at ``down_projection`` / ``eva`` like dna's Primus (plus ``up_projection``, ``mask_token`` and, MAE
  only, an EVA ``decoder``); VoCo, SimCLR and SwinUNETR wrap it as ``encoder``, so stem and encoder sit at
  ``encoder.down_projection`` / ``encoder.eva``, next to the method's heads.

Here the plan's prefixes are renamed to the downstream network's (dna declares them), every other key must belong
to a known non-transferable group (dropped, with the reason, into the transfer report), and anything else is
refused by name: a checkpoint whose keys are not understood is not fine-tuned on silently.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnssl.errors import PretrainedWeightsError

TENSORS_NAMED = 12  # an unknown-key error lists this many keys and counts the rest


@dataclass(frozen=True)
class DroppedGroup:
    """Checkpoint tensors that are never transferred: a key prefix, the group's name in the report, and why."""

    prefix: str
    label: str
    reason: str


# first match wins: the specific decoder groups come before the decoder as a whole
DROPPED_GROUPS: Tuple[DroppedGroup, ...] = (
    DroppedGroup("decoder.encoder.", "decoder.encoder.*", "nnU-Net's duplicate references to the encoder"),
    DroppedGroup("decoder.seg_layers.", "decoder.seg_layers.*", "output heads are task specific and always start "
                                                                "fresh"),
    DroppedGroup("decoder.", "decoder.*", "decoder not transferred (fresh decoder; for U-Nets the _encdec trainer "
                                          "transfers it)"),
    DroppedGroup("up_projection.", "up_projection.*", "a Primus's patch decoder (pretext output), starts fresh"),
    DroppedGroup("mask_token", "mask_token", "the masked-token embedding is used only while pretraining"),
    DroppedGroup("encoder.mask_token", "encoder.mask_token", "the masked-token embedding is used only while "
                                                             "pretraining"),
    DroppedGroup("projector.", "projector.*", "contrastive projection head (VoCo, SimCLR), used only while "
                                              "pretraining"),
    DroppedGroup("rotation_proj_head.", "rotation_proj_head.*", "SwinUNETR's rotation head (pretext only)"),
    DroppedGroup("contrast_proj_head.", "contrast_proj_head.*", "SwinUNETR's contrastive head (pretext only)"),
    DroppedGroup("recon_proj_head.", "recon_proj_head.*", "SwinUNETR's reconstruction head (pretext only)"),
    DroppedGroup("teacher.", "teacher.*", "momentum teacher (the trained student encoder is transferred)"),
    DroppedGroup("momentum_encoder.", "momentum_encoder.*", "momentum teacher (the trained student encoder is "
                                                            "transferred)"),
)


@dataclass(frozen=True)
class Layout:
    """One state-dict layout of a (method, backbone) pair, recognised by its encoder prefix and a marker group."""

    name: str
    key_to_encoder: str
    marker: Optional[str]  # a key prefix only this layout has (None: nothing besides stem and encoder)


LAYOUTS: Tuple[Layout, ...] = (
    Layout("ResEnc U-Net with decoder (MAE, S3D, Models Genesis, VolumeFusion)", "encoder.stages", "decoder."),
    Layout("ResEnc encoder with projector (VoCo, SimCLR)", "encoder.stages", "projector."),
    Layout("ResEnc encoder with SwinUNETR heads", "encoder.stages", "rotation_proj_head."),
    Layout("ResEnc stem and encoder only", "encoder.stages", None),
    Layout("EVA MAE with EVA decoder (MAE on Primus)", "eva", "decoder."),
    Layout("Primus with patch decoder (Models Genesis, VolumeFusion on Primus; nnssl's Primus)", "eva",
           "up_projection."),
    Layout("Primus stem and encoder only", "eva", None),
    Layout("EVA encoder wrapped with projector (VoCo, SimCLR on Primus)", "encoder.eva", "projector."),
    Layout("EVA encoder wrapped with SwinUNETR heads", "encoder.eva", "rotation_proj_head."),
)


def dropped_group(key: str) -> Optional[DroppedGroup]:
    return next((group for group in DROPPED_GROUPS if key.startswith(group.prefix)), None)


def recognised_layout(state: Dict[str, torch.Tensor], key_to_encoder: str) -> str:
    """The name of the layout these keys have (the first whose marker is present), or a generic description."""
    for layout in LAYOUTS:
        if layout.key_to_encoder != key_to_encoder:
            continue
        if layout.marker is None or any(key.startswith(layout.marker) for key in state):
            return layout.name
    return f"encoder at {key_to_encoder}"


@dataclass
class MappedCheckpoint:
    """The checkpoint's tensors under the network's prefixes, and what the mapping did."""

    state: Dict[str, torch.Tensor]
    layout: str
    renamed: List[str]


def rename_prefix(key: str, source: str, target: str) -> Optional[str]:
    if key.startswith(source + "."):
        return target + key[len(source):]
    return None


def map_onto_network(state: Dict[str, torch.Tensor], adaptation_plan: dict,
                     network_prefixes: Dict[str, str], source: str) -> MappedCheckpoint:
    """Rename the plan's stem/encoder prefixes to the network's; refuse keys that are neither those nor a known group.

    ``network_prefixes`` maps "stem"/"encoder" to the network's prefixes; a plan without prefixes is taken to use
    the network's own names (nnU-Net checkpoints with plain dna keys).
    """
    checkpoint_prefixes = {part: adaptation_plan.get(f"key_to_{part}") or network_prefixes[part]
                           for part in ("stem", "encoder")}
    mapped, unknown = {}, []
    for key, value in state.items():
        new_key = None
        for part, prefix in checkpoint_prefixes.items():
            new_key = new_key or rename_prefix(key, prefix, network_prefixes[part])
        if new_key is None and dropped_group(key) is None:
            unknown.append(key)
        mapped[new_key or key] = value
    if unknown:
        listed = "\n".join(f"  {key} {tuple(state[key].shape)}" for key in unknown[:TENSORS_NAMED])
        more = f"\n  ... and {len(unknown) - TENSORS_NAMED} more" if len(unknown) > TENSORS_NAMED else ""
        raise PretrainedWeightsError(
            f"{source}: {len(unknown)} checkpoint tensors are neither under the adaptation plan's stem/encoder "
            f"prefixes ({checkpoint_prefixes['stem']!r}, {checkpoint_prefixes['encoder']!r}) nor a known "
            f"pretraining-only part (decoder, heads, projector, mask token, teacher), so nnssl cannot tell what they "
            f"are:\n{listed}{more}\nCheck key_to_stem/key_to_encoder in the checkpoint's nnssl_adaptation_plan, or "
            f"remove these tensors from network_weights if they are not part of the encoder.")
    renamed = [f"{checkpoint_prefixes[p]}.* -> {network_prefixes[p]}.*" for p in ("stem", "encoder")
               if checkpoint_prefixes[p] != network_prefixes[p]]
    return MappedCheckpoint(mapped, recognised_layout(state, checkpoint_prefixes["encoder"]), renamed)


def dropped_summary(keys: Sequence[str]) -> Dict[str, Tuple[int, str]]:
    """The not-transferred checkpoint keys grouped by ``DROPPED_GROUPS`` label: {label: (count, reason)}."""
    summary: Dict[str, Tuple[int, str]] = {}
    for key in keys:
        group = dropped_group(key)
        label, reason = (group.label, group.reason) if group else ("other", "not part of the transferred parts")
        summary[label] = (summary.get(label, (0, reason))[0] + 1, reason)
    return summary


def token_grid(patch_size: Sequence[int], patch_embed_size: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(p) // int(e) for p, e in zip(patch_size, patch_embed_size))


def resample_positional_embedding(pos_embed: torch.Tensor, source_grid: Sequence[int],
                                  target_grid: Sequence[int]) -> torch.Tensor:
    """A learned (1, tokens, C) positional embedding trained on one token grid, trilinearly resampled to another.

    The reference pretrains its contrastive Primus on 64^3 crops (8^3 tokens) and recommends 160^3 downstream
    (20^3 tokens); its downstream code resamples the embedding the same way. Tokens are ordered as dna's Primus
    flattens them (first spatial axis slowest)."""
    channels = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, *source_grid, channels).permute(0, 4, 1, 2, 3)
    resampled = F.interpolate(grid.float(), size=tuple(target_grid), mode="trilinear", align_corners=False)
    return resampled.permute(0, 2, 3, 4, 1).reshape(1, -1, channels).to(pos_embed.dtype)
