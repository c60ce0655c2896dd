"""VICReg, Barlow Twins and SwAV: learning, gradients, the SwAV queue and Sinkhorn, the loss terms
against their formulas, and the cross-rank statistics under a real 2-process gloo group."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from voxstream.model.encoders import EncoderConfig
from voxstream.model.methods import build_method
from voxstream.model.methods.parts import encode_views
from voxstream.model.methods.barlow import barlow_terms, cross_correlation
from voxstream.model.methods.swav import sinkhorn
from voxstream.model.methods.vicreg import vicreg_terms
from voxstream.model.recipe import method_config

SR = 16000
SMALL_ENCODER = EncoderConfig(name="ecapa", channels=32, embed_dim=32, n_mels=40)
SMALL_METHODS = {
    "vicreg": {"projector_hidden_dim": 64, "projector_output_dim": 64},
    "barlow": {"projector_hidden_dim": 64, "projector_output_dim": 64},
    "swav": {"projector_hidden_dim": 64, "projector_output_dim": 32, "prototypes": 16,
             "queue_size": 32, "queue_start_steps": 2, "freeze_prototypes_steps": 1},
}


def small_method(name: str, **overrides):
    torch.manual_seed(0)
    return build_method(SMALL_ENCODER, method_config({"name": name, **SMALL_METHODS[name], **overrides}))


def speaker_views(gen: torch.Generator, batch: int, n_views: int = 2, seconds: float = 0.4,
                  speakers: int | None = None) -> list[torch.Tensor]:
    """Views of `batch` synthetic speakers: each has its own pitch and harmonic envelope; a view
    redraws the phases and the noise, so what two views share is the speaker's voice. With
    `speakers`, the voices come from a fixed seed (the same speakers at every call)."""
    voices = torch.Generator().manual_seed(speakers) if speakers is not None else gen
    t = torch.arange(int(seconds * SR)) / SR
    f0 = 100 + 200 * torch.rand(batch, 1, generator=voices)
    envelope = torch.rand(batch, 12, generator=voices) ** 2
    harmonics = torch.arange(1, 13)
    views = []
    for _ in range(n_views):
        phase = 2 * math.pi * torch.rand(batch, 12, 1, generator=gen)
        tones = torch.sin(2 * math.pi * f0[:, :, None] * harmonics[None, :, None] * t + phase)
        wave = (envelope[:, :, None] * tones).sum(1) + 0.05 * torch.randn(batch, len(t), generator=gen)
        views.append(0.3 * wave / wave.abs().amax(dim=1, keepdim=True))
    return views


@pytest.mark.parametrize("name", ["vicreg", "barlow", "swav"])
def test_loss_falls_and_gradients_reach_the_encoder(name):
    method = small_method(name)
    method.train()
    opt = torch.optim.Adam(method.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(12):  # 16 fixed speakers, fresh phases and noise at every step
        loss, stats = method(speaker_views(gen, 16, n_views=3 if name == "swav" else 2, speakers=0))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = [p.grad for p in method.encoder.parameters() if p.requires_grad]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert sum(g.abs().sum() for g in grads) > 0
        opt.step()
        method.after_step(step, 12)
        losses.append(loss.item())
        assert {"loss", "embedding_std", "effective_rank"} <= stats.keys()
        assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses


def test_vicreg_terms_match_the_formulas():
    gen = torch.Generator().manual_seed(0)
    # Half the dimensions with std < 1 so the variance hinge is active, correlated dimensions for covariance.
    za = torch.randn(24, 6, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 0.5, 2.0, 1.5, 0.2, 3.0])
    zb = za @ torch.randn(6, 6, generator=gen, dtype=torch.float64) * 0.5
    terms = vicreg_terms(za, zb)
    a, b = za.numpy(), zb.numpy()
    hinge = lambda z: np.mean(np.maximum(0, 1 - np.sqrt(z.var(axis=0, ddof=1) + 1e-4)))
    off_diag = lambda z: (np.cov(z, rowvar=False) ** 2 * (1 - np.eye(6))).sum() / 6
    assert terms["invariance"].item() == pytest.approx(np.mean((a - b) ** 2), rel=1e-9)
    assert terms["variance"].item() == pytest.approx((hinge(a) + hinge(b)) / 2, rel=1e-9)
    assert terms["covariance"].item() == pytest.approx(off_diag(a) + off_diag(b), rel=1e-9)
    assert 0 < terms["variance"].item() and 0 < terms["covariance"].item()


def test_barlow_correlation_and_terms_match_the_formulas():
    gen = torch.Generator().manual_seed(0)
    za = torch.randn(32, 5, generator=gen, dtype=torch.float64) * 3 + 1
    zb = za + torch.randn(32, 5, generator=gen, dtype=torch.float64)
    c = cross_correlation(za, zb).numpy()
    a, b = za.numpy() - za.numpy().mean(0), zb.numpy() - zb.numpy().mean(0)
    # Paper, Eq. 2: c_ij = sum_b a_bi b_bj / (sqrt(sum_b a_bi^2) sqrt(sum_b b_bj^2)), up to BatchNorm's eps.
    expected = (a.T @ b) / np.outer(np.sqrt((a ** 2).sum(0)), np.sqrt((b ** 2).sum(0)))
    np.testing.assert_allclose(c, expected, rtol=1e-5)
    terms = barlow_terms(torch.from_numpy(expected))
    assert terms["on_diagonal"].item() == pytest.approx(sum((1 - expected[i, i]) ** 2 for i in range(5)))
    assert terms["off_diagonal"].item() == pytest.approx(
        sum(expected[i, j] ** 2 for i in range(5) for j in range(5) if i != j))


def test_sinkhorn_equipartitions_the_batch():
    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(256, 32, generator=gen), dim=1)
    w = F.normalize(torch.randn(16, 32, generator=gen), dim=1)
    scores = z @ w.T
    deviation = lambda q: (q.sum(0) / (256 / 16) - 1).abs().max().item()
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(q.sum(1), torch.ones(256))  # each sample: a distribution over prototypes
    assert deviation(q) < 0.3 and deviation(q) < deviation(F.softmax(scores / 0.05, dim=1)) / 2
    assert deviation(sinkhorn(scores, epsilon=0.05, iterations=50)) < 1e-3  # converges to equal shares
    # Assignments still follow the scores: most samples go to their best-scoring prototype.
    assert (q.argmax(1) == scores.argmax(1)).float().mean() > 0.5


def test_swav_queue_fills_then_enters_sinkhorn_and_prototypes_thaw():
    method = small_method("swav")  # queue of 32 rows filled from step 2, prototypes frozen at step 0
    method.train()
    gen = torch.Generator().manual_seed(0)
    used, prototype_grads = [], []
    for step in range(6):
        views = speaker_views(gen, 16)
        loss, stats = method(views)
        method.prototypes.grad = None
        loss.backward()
        prototype_grads.append(method.prototypes.grad.abs().sum().item())
        used.append(stats["queue_used"].item())
        method.after_step(step, 6)
        if step == 2:  # the first enqueue: this batch's projections (16 rows), both assignment views
            with torch.no_grad():  # no optimizer step here: the same weights give the same projections
                z = [F.normalize(method.projector(y), dim=1) for y in encode_views(method.encoder, views)]
            assert method.queue_filled.item() == 16
            torch.testing.assert_close(method.queue[:, :16], torch.stack(z), atol=1e-4, rtol=1e-4)
    assert method.queue_filled.item() == 32 and method.queue.norm(dim=2).sub(1).abs().max() < 1e-4
    assert used == [0, 0, 0, 0, 1, 1]  # 16 rows enqueued at steps 2 and 3: full from step 4 on
    assert prototype_grads[0] == 0 and all(g > 0 for g in prototype_grads[1:])
    assert {"queue", "queue_filled", "steps"} <= method.state_dict().keys()


def _rank_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)  # two processes on a shared CPU
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)  # every rank draws the same full batch and keeps its slice
    za, zb = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    za = za.chunk(world)[rank].clone().requires_grad_(True)
    zb = zb.chunk(world)[rank].clone().requires_grad_(True)
    scores = torch.randn(16, 6).chunk(world)[rank]
    from voxstream.model.distributed import gather_with_grad
    c = cross_correlation(za, zb)
    barlow = sum(barlow_terms(c).values())
    vicreg = sum(vicreg_terms(gather_with_grad(za), gather_with_grad(zb)).values())
    (barlow + vicreg).backward()
    torch.save({"c": c.detach(), "barlow": barlow.detach(), "vicreg": vicreg.detach(),
                "grad_a": za.grad, "q": sinkhorn(scores, 0.05, 3)}, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_cross_rank_statistics_equal_the_concatenated_batch(tmp_path):
    world = 2
    mp.spawn(_rank_worker, args=(world, f"file://{tmp_path}/init", str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]

    torch.manual_seed(0)  # the same draws, in one process
    za = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    zb = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(16, 6)
    c = cross_correlation(za, zb)
    barlow = sum(barlow_terms(c).values())
    vicreg = sum(vicreg_terms(za, zb).values())
    (barlow + vicreg).backward()
    q = sinkhorn(scores, 0.05, 3)

    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["c"], c.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["barlow"], barlow.detach())
        torch.testing.assert_close(got["vicreg"], vicreg.detach())
        # Each rank holds the gradient of the sum of both ranks' (identical) losses: DDP's averaging
        # over the 2 ranks brings it back to the global loss's gradient.
        torch.testing.assert_close(got["grad_a"], world * za.grad.chunk(world)[r])
        torch.testing.assert_close(got["q"], q.chunk(world)[r])
