"""Global embeddings of a plans' network and its transferable weights, for both families (dna U-Nets and Primus).

Contrastive methods (SimCLR, VoCo, the SwinUNETR-style contrastive term) embed a whole crop as one vector:
* a dna U-Net: the global average of every encoder stage output, concatenated (1120-d for ResEnc-L; the VoCo and
  SimCLR reference heads read the same);
* a Primus: the mean of the EVA encoder's output tokens (a transformer has one stage; the reference pools its last
  output the same way).
Only the stem and encoder are exported for transfer (``encoder_state_dict``): the prefixes each network declares
(``key_to_stem``, ``key_to_encoder``), so the result is a partial plain dna state dict that nnssl's fine-tuning and
nnU-Net master's ``PretrainedTrainer`` load by prefix.
"""

from typing import Dict

import torch
from torch import nn

from nnssl.architectures import transferable_prefixes


def is_primus_network(network: nn.Module) -> bool:
    return hasattr(network, "eva") and hasattr(network, "down_projection")


def primus_tokens(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, tokens, embed_dim): the Primus's EVA encoder output for ``x``, register tokens removed (dna's forward
    up to the patch decoder)."""
    tokens = network.down_projection(x).flatten(2).transpose(1, 2)  # b c w h d -> b (w h d) c
    registers = network.register_tokens
    if registers is not None:
        tokens = torch.cat((registers.expand(tokens.shape[0], -1, -1), tokens), dim=1)
    tokens, _ = network.eva(tokens)
    return tokens if registers is None else tokens[:, registers.shape[1]:]


def pooled_stages(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, sum of stage widths): the global average of every stage output of a dna U-Net encoder, concatenated."""
    return torch.cat([stage.flatten(2).mean(dim=2) for stage in encoder(x)], dim=1)


def pooled_features(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, ``pooled_feature_width``): one global embedding per sample."""
    if is_primus_network(network):
        return primus_tokens(network, x).mean(dim=1)
    return pooled_stages(network.encoder, x)


def pooled_feature_width(network: nn.Module) -> int:
    if is_primus_network(network):
        return int(network.embed_dim)
    return int(sum(network.encoder.output_channels))


def freeze_parts_without_gradient(network: nn.Module) -> None:
    """Freeze what an embedding never runs through (a U-Net's decoder, a Primus's patch decoder).

    nnU-Net's DDP wrapper (``find_unused_parameters=False``) rejects parameters without a gradient; frozen, their
    keys stay in the state dict, so checkpoints still load into a plain network. A dna U-Net's decoder holds the
    encoder as a submodule (``decoder.encoder``): those shared parameters stay trainable."""
    if is_primus_network(network):
        network.up_projection.requires_grad_(False)
        return
    encoder_parameters = {id(p) for p in network.encoder.parameters()}
    for parameter in network.decoder.parameters():
        if id(parameter) not in encoder_parameters:
            parameter.requires_grad_(False)


def encoder_state_dict(network: nn.Module) -> Dict[str, torch.Tensor]:
    """The stem and encoder entries of a plain dna network (its declared ``key_to_stem`` / ``key_to_encoder``)."""
    prefixes = tuple(prefix + "." for prefix in transferable_prefixes(network))
    return {key: value for key, value in network.state_dict().items() if key.startswith(prefixes)}


def encoder_only_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The ``encoder.*`` entries of a model that keeps its dna encoder as ``encoder`` (heads are not transferred).

    What the methods export whose head or decoder is discarded after pretraining (VoCo's projector, AMAES'
    decoder).
    """
    return {f"encoder.{key}": value for key, value in model.encoder.state_dict().items()}
