"""NT-Xent (``nnssl.methods.contrastive``): the formula per anchor, and the negatives of every DDP rank (2 gloo
processes give the loss and input gradients of one process holding the whole batch); the same for SimCLR's head
norm over the global batch (``GlobalBatchNorm1d``)."""

import math
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from nnssl.methods.contrastive import nt_xent_loss
from nnssl.methods.simclr import GlobalBatchNorm1d

from contrastive_ranks import WORLD_SIZE, normalised_nt_xent, rank_loss_and_gradients

SPAWN_TIMEOUT = 120  # seconds: two tiny gloo processes start and finish in a few seconds


def brute_force_nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss written per anchor: -log(exp(sim(i, positive)/t) / sum over k != i of exp(sim(i, k)/t))."""
    z = torch.cat([a, b]).double()
    n = a.shape[0]
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        similarity = [F.cosine_similarity(z[i], z[k], dim=0) / temperature for k in range(2 * n)]
        denominator = sum(math.exp(s.item()) for k, s in enumerate(similarity) if k != i)
        losses.append(-math.log(math.exp(similarity[positive].item()) / denominator))
    return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_nt_xent_matches_the_per_anchor_formula(temperature):
    torch.manual_seed(0)
    a, b = torch.randn(3, 5), torch.randn(3, 5) * 4  # any scale: cosine similarity
    loss = nt_xent_loss(a, b, temperature)
    torch.testing.assert_close(loss.double(), brute_force_nt_xent(a, b, temperature), rtol=1e-5, atol=1e-6)
    # identical views far apart from the other sample: the positive dominates, the loss approaches 0
    separated = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert nt_xent_loss(separated, separated, 0.05).item() < 1e-10


def test_nt_xent_refuses_a_batch_without_negatives():
    with pytest.raises(ValueError, match="at least 2 samples"):
        nt_xent_loss(torch.randn(1, 4), torch.randn(1, 4))


def test_global_batch_norm_is_batch_norm_with_batch_statistics_in_one_process():
    x = torch.randn(6, 5) * 3 + 2
    reference = torch.nn.BatchNorm1d(5, track_running_stats=False)
    for mode in (True, False):
        torch.testing.assert_close(GlobalBatchNorm1d(5).train(mode)(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalise", [False, True], ids=["nt_xent", "head_norm_and_nt_xent"])
def test_two_ranks_contrast_with_each_others_samples_as_one_process_over_the_whole_batch(tmp_path: Path, normalise):
    torch.manual_seed(0)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    context = mp.spawn(rank_loss_and_gradients,
                       args=(f"file://{tmp_path / 'rendezvous'}", a, b, str(tmp_path), normalise),
                       nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"the {WORLD_SIZE} gloo ranks did not finish within {SPAWN_TIMEOUT} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    whole_a, whole_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    whole = normalised_nt_xent(whole_a, whole_b, normalise)
    whole.backward()
    # equal shares of anchors: the mean of the rank losses is the loss over the whole batch
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD_SIZE, whole.detach())
    local = normalised_nt_xent(a[:2], b[:2], normalise)  # a rank without the other rank's negatives (and statistics)
    assert not torch.allclose(ranks[0]["loss"], local)
    # each rank's rows get the gradient of the summed rank losses; DDP averages over the ranks
    torch.testing.assert_close(torch.cat([r["grad_a"] for r in ranks]) / WORLD_SIZE, whole_a.grad)
    torch.testing.assert_close(torch.cat([r["grad_b"] for r in ranks]) / WORLD_SIZE, whole_b.grad)
