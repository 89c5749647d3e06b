"""MAE for the Primus transformer with real token dropping: the EVA encoder runs on the visible tokens only.

A block mask (``nnssl.methods.masking``; blocks a multiple of the 8^3 patch embedding) selects the visible tokens.
The encoder is the plans' own dna ``Primus``: its patch embedding tokenises the patch, its absolute positional
embedding is added, then only the visible tokens (with their rotary positions) pass through its EVA blocks, so
the encoder's cost falls with the masked fraction. A light decoder (a few EVA blocks of half the width, with its own
positional embedding and rotary positions) places the encoded tokens back on the grid, fills every masked position
with a learnable mask token, and hands the tokens to the Primus's own patch decoder (``up_projection``), which
reconstructs the voxels.

Why a decoder between encoder and ``up_projection``: dna's patch decoder is a stack of kernel = stride transposed
convolutions, so each output voxel depends on its own token only. Filled with a constant mask token (dna's
``restore_full_sequence``), every masked token would decode to the same value, independent of the visible tokens,
and the loss on masked voxels would give the encoder no gradient at all. The decoder's attention is what lets
visible tokens inform the masked ones.

``network`` stays a plain dna Primus (its ``mask_token`` buffer untouched): ``network.state_dict()`` has the keys of
a fresh Primus and loads wherever one does; the decoder lives beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from dynamic_network_architectures.architectures.primus import Primus
from dynamic_network_architectures.building_blocks.eva import Eva
from torch import nn

from nnssl.methods.masking import upsample_mask

MASK_TOKEN_STD = 0.02


@dataclass(frozen=True)
class TokenDecoderConfig:
    """The MAE decoder: ``depth`` EVA blocks with ``head_fraction`` of the encoder's heads at the same head width."""

    depth: int = 2
    head_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.depth < 1 or not 0 < self.head_fraction <= 1:
            raise ValueError(f"TokenDecoderConfig needs depth >= 1 and 0 < head_fraction <= 1, got {self}.")


def token_grid(network: Primus, patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Tokens per axis of a patch: the patch divided by the patch embedding's kernel."""
    embedding = tuple(network.down_projection.proj.kernel_size)
    if any(int(p) % e for p, e in zip(patch_size, embedding)):
        raise ValueError(f"Patch size {list(patch_size)} is not divisible by the Primus patch embedding "
                         f"{list(embedding)}.")
    return tuple(int(p) // e for p, e in zip(patch_size, embedding))


def visible_token_indices(mask: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, n_visible) sorted indices, in the Primus token order (w h d), of the tokens a (B, 1, *cells) visible mask
    leaves visible. Every sample must keep the same number of tokens (the batch stays one dense tensor)."""
    cells = tuple(mask.shape[2:])
    if len(cells) != len(grid) or any(g % c for g, c in zip(grid, cells)):
        raise ValueError(f"A mask grid of {cells} cells does not tile the {tuple(grid)} token grid: the mask block "
                         f"size must be a multiple of the Primus patch embedding.")
    visible = upsample_mask(mask, grid).flatten(1) > 0
    counts = visible.sum(dim=1)
    if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise ValueError(f"Token dropping needs the same, non-zero number of visible tokens in every sample, got "
                         f"{counts.tolist()}.")
    return visible.nonzero(as_tuple=True)[1].view(mask.shape[0], -1)


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, C) at indices (B, K) -> (B, K, C)."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class PrimusMAEModel(nn.Module):
    """Masked autoencoder around a plain dna Primus: sparse (visible-only) encoder, light token decoder."""

    def __init__(self, network: Primus, patch_size: Sequence[int],
                 decoder: TokenDecoderConfig = TokenDecoderConfig()) -> None:
        super().__init__()
        if network.register_tokens is not None:
            raise ValueError("PrimusMAEModel supports Primus without register tokens (num_register_tokens=0).")
        self.network = network
        self.grid = token_grid(network, patch_size)
        heads = network.eva.blocks[0].attn.num_heads
        head_width = network.embed_dim // heads
        decoder_heads = max(1, round(heads * decoder.head_fraction))
        width = decoder_heads * head_width
        device = next(network.parameters()).device
        self.decoder_embed = nn.Linear(network.embed_dim, width, device=device)
        self.mask_token = nn.Parameter(torch.empty(1, 1, width, device=device))
        nn.init.trunc_normal_(self.mask_token, std=MASK_TOKEN_STD, a=-MASK_TOKEN_STD, b=MASK_TOKEN_STD)
        self.decoder = Eva(embed_dim=width, depth=decoder.depth, num_heads=decoder_heads, ref_feat_shape=self.grid,
                           use_abs_pos_emb=True, use_rot_pos_emb=True).to(device)
        self.decoder_projection = nn.Linear(width, network.embed_dim, device=device)

    def encode(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The EVA encoder on the visible tokens ``keep`` (B, K) only: (B, K, embed_dim).

        As dna's ``Eva.forward_features`` (absolute positions added to every token, dropout, blocks, final norm), with
        the sequence cut to the visible tokens after the positional embedding and the rotary embedding cut to the
        same positions."""
        eva = self.network.eva
        tokens = self.network.down_projection(x).flatten(2).transpose(1, 2)  # b c w h d -> b (w h d) c
        if eva.pos_embed is not None:
            tokens = tokens + eva.pos_embed
        tokens = gather_tokens(eva.pos_drop(tokens), keep)
        # (N, R) -> (B, 1, K, R): one rotary embedding per sample's visible tokens, broadcast over the heads
        rope = eva.rope.get_embed()[keep].unsqueeze(1) if eva.rope is not None else None
        for block in eva.blocks:
            tokens = block(tokens, rope=rope)
        return eva.norm(tokens)

    def decode(self, visible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoded visible tokens (B, K, embed_dim) -> reconstruction (B, C, *patch) through mask tokens, the token
        decoder and the Primus's patch decoder."""
        batch, n_tokens = visible.shape[0], self.grid[0] * self.grid[1] * self.grid[2]
        embedded = self.decoder_embed(visible)
        filled = self.mask_token.to(embedded.dtype).expand(batch, n_tokens, -1)
        filled = filled.scatter(1, keep.unsqueeze(-1).expand(-1, -1, embedded.shape[-1]), embedded)
        decoded, _ = self.decoder(filled)
        tokens = self.decoder_projection(decoded)
        return self.network.up_projection(tokens.transpose(1, 2).reshape(batch, -1, *self.grid))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction (B, C, *patch) from the visible blocks of ``mask`` (B, 1, *cells; 1 = visible).

        ``keep``: the mask's ``visible_token_indices``, when computed elsewhere (a FLOP count on the meta device
        cannot, the indices being data dependent)."""
        if mask.dim() != x.dim() or mask.shape[0] != x.shape[0] or mask.shape[1] != 1:
            raise ValueError(f"Expected a (B, 1, *grid) mask for an input of shape {tuple(x.shape)}, got "
                             f"{tuple(mask.shape)}.")
        if keep is None:
            keep = visible_token_indices(mask, self.grid)
        return self.decode(self.encode(x, keep), keep)
