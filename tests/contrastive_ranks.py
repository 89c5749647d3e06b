"""The per-rank side of test_contrastive's two-process check. It lives in its own module on pytest's ``pythonpath``
because ``torch.multiprocessing.spawn`` pickles the rank function by module name, and the child processes cannot
import test modules under ``--import-mode=importlib`` when nnssl is installed as a regular (non-editable) package."""

from datetime import timedelta

import torch
import torch.distributed as dist

from nnssl.methods.contrastive import nt_xent_loss
from nnssl.methods.simclr import GlobalBatchNorm1d

WORLD_SIZE = 2


def normalised_nt_xent(a: torch.Tensor, b: torch.Tensor, normalise: bool) -> torch.Tensor:
    """NT-Xent of the two views, optionally after SimCLR's head norm over every view of the (global) batch."""
    if normalise:
        both = GlobalBatchNorm1d(a.shape[1])(torch.cat([a, b]))
        a, b = both[:a.shape[0]], both[a.shape[0]:]
    return nt_xent_loss(a, b, 0.5)


def rank_loss_and_gradients(rank: int, rendezvous: str, a: torch.Tensor, b: torch.Tensor, out: str,
                             normalise: bool) -> None:
    """One rank: its half of the batch, the loss with negatives (and norm statistics) from both ranks, the gradients
    of its own rows."""
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    try:
        rows = slice(rank * a.shape[0] // WORLD_SIZE, (rank + 1) * a.shape[0] // WORLD_SIZE)
        local_a, local_b = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
        loss = normalised_nt_xent(local_a, local_b, normalise)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad_a": local_a.grad, "grad_b": local_b.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
