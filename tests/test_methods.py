"""The contract every method keeps (views, evaluation network, no host reads in a step, resumable
schedules); SimCLR, MoCo and DINO: learning, gradient routing, queue/center updates, and the
cross-rank collectives under a real 2-process gloo group."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from ranks import run_ranks
from small_methods import METHODS, make, views_for
from voices import voices
from voxstream.model.methods.simclr import nt_xent

GROUPS = torch.tensor([0, 1, 1, 2, 3, 0, 4, 5])  # repeats within a rank and across the two


def batch(name: str, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return views_for(name, voices(size, seed), g)


# --- what every method does the same way -------------------------------------------------------

VIEW_COUNTS = {"simclr": (2, 2), "moco": (2, 2), "vicreg": (2, 2), "barlow": (2, 2),
               "dino": (3, None), "swav": (2, None)}  # (fewest, most); None: any number of local crops


@pytest.mark.parametrize("name", METHODS)
def test_a_wrong_number_of_views_is_one_error_naming_the_method(name):
    method = make(name)
    fewest, most = VIEW_COUNTS[name]
    assert method.view_counts() == (fewest, most)
    need = f"{fewest}" if fewest == most else f"at least {fewest}"
    for n in [fewest - 1] + ([most + 1] if most else []):  # too few; too many (never silently dropped)
        with pytest.raises(ValueError, match=rf"^{name} takes {need} views \(data\.views\), got {n}$"):
            method([torch.zeros(4, 8000)] * n)


@pytest.mark.parametrize("name", METHODS)
def test_evaluation_uses_the_teacher_for_dino_and_the_encoder_otherwise(name):
    method = make(name)
    assert method.embedder() is (method.teacher_encoder if name == "dino" else method.encoder)


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Python reads of a tensor's value raise: on a GPU each one waits for the device."""
    def refuse(what):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{what} in a training step (a host-device sync on a GPU)")
        return read
    with monkeypatch.context() as m:
        for what in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
            m.setattr(torch.Tensor, what, refuse(what))
        yield


@pytest.mark.parametrize("name", METHODS)
def test_a_training_step_reads_no_tensor_on_the_host(name, monkeypatch):
    # SwAV: a queue that is full after two steps, so the freeze, the enqueue and the queued
    # Sinkhorn all run; DINO: the prototypes are frozen for two steps, then learn.
    method = make(name, **{"swav": {"queue_size": 16, "queue_start_fraction": 0.0},
                           "dino": {"freeze_last_layer_fraction": 0.2}}.get(name, {}))
    views = [batch(name, seed=s) for s in range(3)]
    with no_host_reads(monkeypatch):
        for step, v in enumerate(views):
            loss, stats = method(v)
            loss.backward()
            method.after_step(step, len(views))
    if name == "swav":
        assert stats["queue_used"].item() == 1


@pytest.mark.parametrize("name", ["dino", "swav"])
def test_a_resumed_method_makes_the_same_schedule_decisions(name):
    # Three steps of six take DINO (1/10) and SwAV (1/6) past their prototype freeze, and the third
    # fills SwAV's queue (8 rows, from 1/3 on), so the next step uses it.
    overrides = {"dino": {"freeze_last_layer_fraction": 0.1}, "swav": {"queue_size": 8}}[name]
    method = make(name, **overrides)
    for step in range(3):
        method(batch(name, seed=step))[0].backward()
        method.after_step(step, 6)
    resumed = make(name, seed=1, **overrides)
    resumed.load_state_dict(method.state_dict())
    assert type(resumed.host_progress) is float and resumed.host_progress == method.host_progress
    if name == "swav":
        assert type(resumed.host_queue_filled) is int and resumed.host_queue_filled == method.host_queue_filled == 8
    results = []
    for m in (method, resumed):
        m.zero_grad()
        loss, stats = m(batch(name, seed=3))
        loss.backward()
        results.append((loss, stats, [p.grad for p in m.parameters() if p.requires_grad]))
    (loss, stats, grads), (loss2, stats2, grads2) = results
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(stats2, stats)
    torch.testing.assert_close(grads2, grads)
    prototypes = method.head.last_layer.weight if name == "dino" else method.prototypes
    assert prototypes.grad.abs().sum() > 0  # past the freeze
    assert name == "dino" or stats["queue_used"].item() == 1


@pytest.mark.parametrize("name", ["simclr", "moco", "dino"])
def test_loss_falls_on_a_learnable_problem(name):
    # A teacher/key encoder that follows the student quickly (momentum 0.9) and no teacher
    # temperature warm-up, so 25 steps show the learning that long schedules spread out.
    method = make(name, **({"teacher_momentum": 0.9, "teacher_temp": 0.04} if name == "dino" else {}))
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    speakers, g, losses = voices(64, seed=1), torch.Generator().manual_seed(2), []
    steps = 25
    for step in range(steps):
        loss, stats = method(views_for(name, speakers[torch.randperm(64, generator=g)[:16]], g))
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

def _rank_main(rank: int, world: int) -> dict:
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
    return result


def test_two_ranks_match_one_process_over_the_whole_batch():
    ranks = run_ranks(_rank_main)
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
