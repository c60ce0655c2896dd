"""SimCLR, MoCo and DINO: learning, gradient routing, queue/center updates, and the cross-rank
collectives under a real 2-process gloo group."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from voxstream.model.encoders import EncoderConfig
from voxstream.model.methods import build_method
from voxstream.model.methods.simclr import nt_xent
from voxstream.model.recipe import method_config

SR = 16000
GROUPS = torch.tensor([0, 1, 1, 2, 3, 0, 4, 5])  # repeats within a rank and across the two
TINY = EncoderConfig("ecapa", channels=32, embed_dim=32)
SMALL = {  # published recipes shrunk to test size
    "simclr": {"name": "simclr", "projector_hidden_dim": 64, "projector_output_dim": 32},
    "moco": {"name": "moco", "queue_size": 96, "momentum": 0.9, "projector_hidden_dim": 64, "projector_output_dim": 32},
    "dino": {"name": "dino", "out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32},
}


def speakers(n: int, seed: int) -> torch.Tensor:
    """Per speaker: a pitch and a harmonic envelope (the "voice"), fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    f0 = 90 + 200 * torch.rand(n, 1, generator=g)
    envelope = torch.rand(n, 12, generator=g) ** 2
    return torch.cat([f0, envelope], dim=1)


def utterances(voices: torch.Tensor, seconds: float, g: torch.Generator) -> torch.Tensor:
    """One crop per voice: its harmonics with random phases, switched on and off in 80 ms
    "syllables" (the front-end's mean normalisation would erase a stationary tone), with random
    gain and background noise, so two crops of one voice agree only in the voice."""
    n, t = len(voices), torch.arange(int(seconds * SR)) / SR
    f0, env = voices[:, :1], voices[:, 1:]
    h = torch.arange(1, env.shape[1] + 1)
    phase = 2 * math.pi * torch.rand(n, len(h), 1, generator=g)
    wave = (env.unsqueeze(-1) * torch.sin(2 * math.pi * (f0 * h).unsqueeze(-1) * t + phase)).sum(1)
    syllables = (torch.rand(n, len(t) // 1280 + 1, generator=g) < 0.6).float()
    wave = wave / wave.abs().amax(dim=1, keepdim=True) * syllables.repeat_interleave(1280, dim=1)[:, :len(t)]
    gain = 0.2 + 0.8 * torch.rand(n, 1, generator=g)
    return gain * (wave + 0.03 * torch.randn(wave.shape, generator=g))


def views_for(name: str, voices: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
    durations = [0.5, 0.5] + ([0.25, 0.25] if name == "dino" else [])
    return [utterances(voices, d, g) for d in durations]


def make(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_method(TINY, method_config({**SMALL[name], **overrides}))


def batch(name: str, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return views_for(name, speakers(size, seed), g)


@pytest.mark.parametrize("name", ["simclr", "moco", "dino"])
def test_loss_falls_on_a_learnable_problem(name):
    # A teacher/key encoder that follows the student quickly (momentum 0.9) and no teacher
    # temperature warm-up, so 25 steps show the learning that long schedules spread out.
    method = make(name, **({"teacher_momentum": 0.9, "teacher_temp": 0.04} if name == "dino" else {}))
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    voices, g, losses = speakers(64, seed=1), torch.Generator().manual_seed(2), []
    steps = 25
    for step in range(steps):
        loss, stats = method(views_for(name, voices[torch.randperm(64, generator=g)[:16]], g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step, steps)
        losses.append(loss.item())
        assert all(torch.isfinite(v) for v in stats.values())
    # MoCo starts with a queue of random vectors (easy negatives): compare once it holds keys.
    first, last = sum(losses[3:8]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, losses


@pytest.mark.parametrize("name, teacher", [("moco", "momentum_"), ("dino", "teacher_")])
def test_gradients_reach_the_encoder_not_the_momentum_branch(name, teacher):
    method = make(name)
    loss, _ = method(batch(name))
    loss.backward()
    student = dict(method.encoder.named_parameters())
    assert all(p.grad is not None for p in student.values())
    assert sum(p.grad.abs().sum() for p in student.values()) > 0
    frozen = [p for n, p in method.named_parameters() if n.startswith(teacher)]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)


def test_simclr_gradients_reach_every_trained_parameter():
    method = make("simclr")
    method(batch("simclr"))[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


def test_momentum_update_is_an_ema_of_the_encoder():
    method = make("moco")
    before = [p.clone() for p in method.momentum_encoder.parameters()]
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(0.1)
    method.after_step(0, 10)
    for old, new, p in zip(before, method.momentum_encoder.parameters(), method.encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * p)


def test_moco_enqueues_both_views_keys_and_wraps():
    method = make("moco", queue_size=40)
    views = batch("moco", size=8)
    method(views)
    with torch.no_grad():  # the keys again: both views through the momentum encoder in one batch
        embeddings = method.momentum_encoder(torch.cat(views)).chunk(2)
        keys = torch.nn.functional.normalize(torch.cat([method.momentum_projector(y) for y in embeddings]), dim=1)
    torch.testing.assert_close(method.queue[:16], keys)
    assert int(method.queue_ptr) == 16
    method(views)
    method(views)  # 48 keys into 40 slots: the third batch wraps to the front
    assert int(method.queue_ptr) == 8
    torch.testing.assert_close(method.queue[:8], keys[8:])
    torch.testing.assert_close(method.queue[32:40], keys[:8])


def test_dino_center_is_an_ema_of_the_teacher_output():
    method = make("dino")
    views = batch("dino")
    method(views)
    with torch.no_grad():
        out = method.teacher_head(method.teacher_encoder(torch.cat(views[:2])))
    torch.testing.assert_close(method.center, 0.1 * out.mean(dim=0, keepdim=True), atol=1e-6, rtol=1e-4)
    method(views)
    with torch.no_grad():
        out2 = method.teacher_head(method.teacher_encoder(torch.cat(views[:2])))
    expected = 0.9 * 0.1 * out.mean(dim=0, keepdim=True) + 0.1 * out2.mean(dim=0, keepdim=True)
    torch.testing.assert_close(method.center, expected, atol=1e-6, rtol=1e-4)


def test_dino_schedules_and_evaluation_network():
    method = make("dino")
    assert method.teacher_temp() == pytest.approx(0.04)
    method.after_step(10, 100)  # half-way through the 20% warm-up
    assert method.teacher_temp() == pytest.approx(0.055)
    method.after_step(50, 100)
    assert method.teacher_temp() == pytest.approx(0.07)
    teacher = [p.clone() for p in method.teacher_encoder.parameters()]
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    method.after_step(100, 100)  # momentum 1 at the end: the teacher no longer moves
    assert all(torch.equal(a, b) for a, b in zip(teacher, method.teacher_encoder.parameters()))
    assert method.embedder() is method.teacher_encoder
    assert make("simclr").embedder() is not None


def test_dino_prototypes_are_frozen_at_first():
    method = make("dino", freeze_last_layer_fraction=0.1)
    method(batch("dino"))[0].backward()
    assert method.head.last_layer.weight.grad.abs().sum() == 0
    method.zero_grad()
    method.after_step(10, 100)
    method(batch("dino"))[0].backward()
    assert method.head.last_layer.weight.grad.abs().sum() > 0


def test_state_dict_carries_queue_and_center():
    for name, key in [("moco", "queue"), ("dino", "center")]:
        method = make(name)
        method(batch(name))
        fresh = make(name, seed=1)
        fresh.load_state_dict(method.state_dict())
        assert torch.equal(getattr(fresh, key), getattr(method, key))


# --- two real processes (gloo): what crosses ranks ---------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = {}
        for name in ("simclr", "moco"):
            method = make(name).eval()  # BatchNorm on running stats: per-sample, rank-independent
            views = [v.chunk(world)[rank] for v in batch(name, size=8)]
            loss, _ = method(views, GROUPS.chunk(world)[rank])
            loss.backward()
            grads = [p.grad.clone() for p in method.parameters() if p.grad is not None]
            for g in grads:  # what DDP does
                dist.all_reduce(g)
                g /= world
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            result[name] = {"loss": mean_loss / world, "grads": grads, "queue": method.queue.clone()
                            if name == "moco" else None, "ptr": int(getattr(method, "queue_ptr", 0)),
                            "queue_groups": getattr(method, "queue_groups", None)}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_over_the_whole_batch(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("simclr", "moco"):
        method = make(name).eval()
        loss, _ = method(batch(name, size=8), GROUPS)
        loss.backward()
        grads = [p.grad for p in method.parameters() if p.grad is not None]
        for r in ranks:
            got = r[name]
            assert abs(got["loss"].item() - loss.item()) < 1e-5, (name, got["loss"], loss)
            assert len(got["grads"]) == len(grads)
            for a, b in zip(got["grads"], grads):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # MoCo: each rank's queue holds the keys of both ranks, view 1 then view 2, in rank order.
    for r in ranks:
        assert r["moco"]["ptr"] == int(method.queue_ptr) == 16
        torch.testing.assert_close(r["moco"]["queue"][:16], method.queue[:16], atol=1e-5, rtol=1e-4)
        assert r["moco"]["queue_groups"][:16].tolist() == GROUPS.repeat(2).tolist()


def test_simclr_leaves_the_anchors_group_out_of_its_negatives():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    loss, _ = nt_xent(z1, z2, 0.2, groups)
    anchors, group = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1), groups.repeat(2)
    terms = []
    for i in range(12):  # the denominator: the positive and every sample of another group
        positive = (i + 6) % 12
        kept = [j for j in range(12) if j == positive or group[j] != group[i]]
        logits = anchors[i] @ anchors[kept].T / 0.2
        terms.append(torch.logsumexp(logits, 0) - logits[kept.index(positive)])
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    plain = nt_xent(z1, z2, 0.2)[0]
    torch.testing.assert_close(nt_xent(z1, z2, 0.2, torch.arange(6))[0], plain)  # all distinct: plain NT-Xent
    assert abs(loss.item() - plain.item()) > 1e-3


def test_moco_skips_queued_keys_of_the_querys_group():
    method = make("moco", queue_size=40)
    views = batch("moco", size=8)
    method(views, torch.arange(100, 108))
    assert method.queue_groups.tolist() == list(range(100, 108)) * 2 + [-1] * 24
    method.queue_groups.fill_(7)
    alone, _ = method(views, torch.full((8,), 7))  # every queued key is of the query's own group
    assert alone.item() < 1e-6  # the positive is the only candidate left
    method.queue_groups.fill_(7)
    assert method(views)[0].item() > 0.1  # without groups the queue stays negative
