"""NT-Xent (normalised temperature-scaled cross entropy, SimCLR's loss) with negatives from every DDP rank.

Two views of N samples give 2N embeddings. Each embedding's positive is the other view of its sample; its negatives
are the 2N - 2 other embeddings, and under DDP also the 2N embeddings of every other rank (gathered with their
gradient kept on the rank that owns them, as SimCLR's large-batch setting). The loss is the cross entropy of the
positive among all candidates, with cosine similarities divided by the temperature, averaged over this rank's
anchors; DDP's gradient averaging then gives the mean over all anchors of the global batch.

(The reference's ``NTXentLoss`` sees only its own rank's batch; its docstring says it is untested under DDP.)
"""

from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

DEFAULT_TEMPERATURE = 0.5  # the reference's SimCLR setting (SimCLR's paper: 0.1-1.0 depending on the batch)


def gather_across_ranks(z: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(all ranks' rows concatenated in rank order, offset of this rank's rows); gradients flow back to the owner."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    parts = all_gather(z.contiguous())
    return torch.cat(parts), dist.get_rank() * z.shape[0]


def nt_xent_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                 across_ranks: bool = True) -> torch.Tensor:
    """NT-Xent of two (N, D) embeddings whose row i is the same sample seen twice (any scale; cosine is used)."""
    if view_a.shape != view_b.shape or view_a.dim() != 2:
        raise ValueError(f"NT-Xent needs two (N, D) embeddings of the same shape, got {tuple(view_a.shape)} and "
                         f"{tuple(view_b.shape)}.")
    if not temperature > 0:
        raise ValueError(f"The NT-Xent temperature must be positive, not {temperature}.")
    local = F.normalize(torch.cat([view_a, view_b]).float(), dim=1)  # (2N, D): views a then b
    n = view_a.shape[0]
    candidates, offset = gather_across_ranks(local) if across_ranks else (local, 0)
    if candidates.shape[0] < 4:
        raise ValueError(f"NT-Xent needs at least 2 samples in the (global) batch to have a negative, got "
                         f"{candidates.shape[0] // 2}.")
    logits = local @ candidates.T / temperature  # (2N, 2N x ranks)
    rows = torch.arange(2 * n, device=local.device)
    logits[rows, offset + rows] = float("-inf")  # an embedding is not its own candidate
    positives = offset + (rows + n) % (2 * n)  # a's positive is b and vice versa, within this rank's block
    return F.cross_entropy(logits, positives)
