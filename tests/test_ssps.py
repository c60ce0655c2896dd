"""SSPS (model/ssps.py) on planted data: the positive comes from the nearest other cluster and never
from the anchor's own utterance; queues and centroids agree across 2 gloo ranks; the schedule; the
state survives a checkpoint. The trainer's use of it is tested in test_train_ssps.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ranks import run_ranks
from voxstream.model.ssps import SSPS, SSPSConfig, positive_share, sampling_step

SPEAKERS, SESSIONS, PER_SESSION, DIM = 4, 2, 8, 16
N = SPEAKERS * SESSIONS * PER_SESSION


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit embeddings [N, DIM], session of each): each speaker's two sessions are tight clusters
    close to each other and far from every other speaker's. Utterance i is row i; sessions are
    contiguous, as in shards. (K-means need not find the sessions: the tests check SSPS's rules
    against the clusters it found.)"""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(DIM, DIM, generator=g))[0]
    speaker = torch.arange(N) // (SESSIONS * PER_SESSION)
    session = torch.arange(N) // PER_SESSION
    centres = basis[speaker] + 0.4 * basis[SPEAKERS + session]
    return F.normalize(centres + 0.03 * torch.randn(N, DIM, generator=g), dim=1), session


def speaker_of(session: torch.Tensor) -> torch.Tensor:
    """Speaker ids as the trainer passes them: 0 means the metadata names none."""
    return session // SESSIONS + 1


def make_ssps(steps_per_epoch: int = 1, total_steps: int = 4, **overrides) -> SSPS:
    """Sampling from step 2 (half of 4 steps), the queues filling from step 1."""
    cfg = SSPSConfig(enabled=True, start=0.5, clusters=SPEAKERS * SESSIONS, neighbours=1, queue_size=N,
                     ref_seconds=1.0, **overrides)
    return SSPS(cfg, N, DIM, steps_per_epoch, total_steps, device=torch.device("cpu"))


def step(ssps: SSPS, at: int, x: torch.Tensor, indices: torch.Tensor, session: torch.Tensor) -> torch.Tensor:
    """One step's SSPS calls around a stand-in method whose positive-branch output is the one-hot
    index of the item: what swap returns names the utterance each positive came from."""
    positives = ssps.begin(at, nn.Identity(), x[indices], indices, session[indices], speaker_of(session[indices]))
    drawn = positives.swap(F.one_hot(indices, N).float()).argmax(dim=1)
    ssps.remember(at, positives)
    return torch.where(positives.rows >= 0, drawn, -1) if positives.rows is not None else None


def test_the_positive_comes_from_the_nearest_other_cluster_never_the_anchors_own_utterance():
    x, session = planted()
    ssps, everyone = make_ssps(), torch.arange(N)
    assert step(ssps, 0, x, everyone, session) is None  # before the queues fill: nothing happens
    assert not ssps.filled.any()
    assert step(ssps, 1, x, everyone, session) is None  # the epoch before sampling: queues fill only
    assert ssps.filled[:N].all() and ssps.queue is not None
    for at in (2, 3):  # sampling on; each step an epoch here, so each reclusters first
        drawn = step(ssps, at, x, everyone, session)
        assert ssps.clusters == SPEAKERS * SESSIONS
        assert (drawn >= 0).all(), "every anchor has a queued utterance in the neighbouring cluster"
        assert not (drawn == everyone).any()
        assert torch.equal(cluster_of(ssps, drawn), nearest_other(ssps)[cluster_of(ssps, everyone)])
    stats = ssps.stats(ssps.begin(3, nn.Identity(), x, everyone, session, speaker_of(session)))
    assert stats["ssps_sampled"] == 1.0 and stats["ssps_clusters"] == SPEAKERS * SESSIONS
    same = session[drawn] == session  # the monitors count positives from the anchor's session and speaker
    assert stats["ssps_same_group"] == same.float().mean()
    assert stats["ssps_same_speaker"] == (session[drawn] // SESSIONS == session // SESSIONS).float().mean()


def cluster_of(ssps: SSPS, indices: torch.Tensor) -> torch.Tensor:
    return ssps.assignment[indices]


def nearest_other(ssps: SSPS) -> torch.Tensor:
    """Each cluster's most similar other centroid, computed here the direct way."""
    sim = ssps.centroids @ ssps.centroids.T
    return (sim - 3 * torch.eye(len(sim))).argmax(dim=1)


def test_an_anchor_without_a_queued_neighbour_keeps_its_own_positive_and_is_counted():
    x, session = planted()
    ssps, everyone = make_ssps(steps_per_epoch=2, total_steps=8), torch.arange(N)  # samples from step 4
    for at in (2, 3, 4):
        step(ssps, at, x, everyone, session)
    anchors = cluster_of(ssps, everyone)
    emptied = nearest_other(ssps)[anchors[0]]
    ssps.queue_index[cluster_of(ssps, ssps.queue_index) == emptied] = -1  # its entries leave the positive queue
    found, counted = int(ssps.found), int(ssps.anchors)
    positives = ssps.begin(5, nn.Identity(), x, everyone, session, speaker_of(session))  # no reclustering
    kept = nearest_other(ssps)[anchors] == emptied
    assert torch.equal(positives.rows < 0, kept)
    own = torch.randn(N, N)
    swapped = positives.swap(own)
    assert torch.equal(swapped[kept], own[kept]) and not torch.equal(swapped[~kept], own[~kept])
    positives.speakers = torch.zeros_like(positives.speakers)  # metadata without speakers: nothing to count
    stats = ssps.stats(positives)
    assert stats["ssps_sampled"] == 1 - kept.float().mean() and stats["ssps_same_speaker"] == 0
    assert ssps.found - found == (~kept).sum() and ssps.anchors - counted == N == counted  # the run's totals


def test_sampling_starts_at_the_first_epoch_boundary_after_the_warm_up_and_queues_fill_an_epoch_before():
    cfg = SSPSConfig(enabled=True, start=0.25)
    assert sampling_step(cfg, steps_per_epoch=10, total_steps=100) == 30  # 25 steps, rounded up to an epoch
    assert sampling_step(SSPSConfig(start=0.3), 10, 100) == 30
    assert sampling_step(SSPSConfig(start=0.0), 10, 100) == 0
    ssps = SSPS(cfg, N, DIM, steps_per_epoch=10, total_steps=100, device=torch.device("cpu"))
    assert (ssps.fill_step, ssps.start_step) == (20, 30)


def test_a_strided_float16_queue_keeps_one_utterance_in_stride():
    x, session = planted()
    ssps, everyone = make_ssps(queue_stride=2, queue_dtype="float16"), torch.arange(N)
    assert ssps.ref.dtype == torch.float16 and len(ssps.ref) == N // 2 + 1
    step(ssps, 1, x, everyone, session)
    assert ssps.filled.sum() == N // 2
    torch.testing.assert_close(ssps.ref[:-1].float(), x[::2], atol=2e-3, rtol=0)
    drawn = step(ssps, 2, x, everyone, session)
    assert (drawn % 2 == 0).all()
    anchors = ssps.assignment[everyone // 2]  # the strided rows: utterances 0, 2, 4, ...
    odd = everyone % 2 == 1  # out of the queue: their cluster is the nearest centroid of their reference
    anchors[odd] = (x[odd] @ ssps.centroids.T).argmax(dim=1)
    assert torch.equal(ssps.assignment[drawn // 2], nearest_other(ssps)[anchors])


def test_the_state_survives_a_checkpoint_and_draws_the_same_positives():
    x, session = planted()
    ssps, everyone = make_ssps(), torch.arange(N)
    step(ssps, 1, x, everyone, session)
    step(ssps, 2, x, everyone, session)
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ssps.state_dict().items()}
    resumed = make_ssps()
    resumed.load_state_dict(saved)
    torch.manual_seed(5)
    expected = step(ssps, 3, x, everyone, session)
    torch.manual_seed(5)
    assert torch.equal(step(resumed, 3, x, everyone, session), expected)
    assert (resumed.queue_ptr, resumed.clusters) == (ssps.queue_ptr, ssps.clusters)


def _two_rank_queues(rank: int, world: int) -> dict:
    """Each rank steps with its own half of the utterances; returns its whole SSPS state."""
    x, session = planted()
    ssps = make_ssps()
    mine = torch.arange(N).view(world, -1)[rank]
    for at in (1, 2, 3):
        step(ssps, at, x, mine, session)
    return ssps.state_dict()


def test_queues_and_centroids_agree_across_two_gloo_ranks_and_with_one_process():
    ranks = run_ranks(_two_rank_queues)
    for name, value in ranks[0].items():
        other = ranks[1][name]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
    x, session = planted()
    alone = make_ssps()
    for at in (1, 2, 3):
        step(alone, at, x, torch.arange(N), session)
    assert torch.equal(ranks[0]["filled"], alone.filled)
    torch.testing.assert_close(ranks[0]["ref"], alone.ref)
    torch.testing.assert_close(ranks[0]["centroids"], alone.centroids, atol=1e-5, rtol=0)
    assert torch.equal(ranks[0]["assignment"], alone.assignment)


def test_the_offline_positive_share_counts_members_of_the_nearest_other_cluster():
    def on_circle(*degrees):
        angles = torch.tensor(degrees, dtype=torch.float64).deg2rad()
        return torch.stack([angles.cos(), angles.sin()], dim=1)

    # Clusters 0 and 1 are each other's nearest, 2 and 3 too. Cluster 0 holds speakers A B, 1 holds A A A B,
    # 2 and 3 one C each: A in 0 draws A from 1 with 3/4, B 1/4; A and B in 1 draw theirs from 0 with 1/2; C: 1.
    assigned = np.array([0, 0, 1, 1, 1, 1, 2, 3])
    speakers = np.array(["A", "B", "A", "A", "A", "B", "C", "C"])
    assert positive_share(on_circle(0, 10, 180, 190), assigned, speakers) == pytest.approx(5 / 8)
    # An empty cluster 4 nearest to 2 and 3: the C anchors draw nothing and are left out.
    assert positive_share(on_circle(0, 10, 180, 190, 181), assigned, speakers) == pytest.approx(3 / 6)
    # M = 2: every cluster's second nearest is on the other side and shares no speaker: half the M = 1 share.
    assert positive_share(on_circle(0, 10, 180, 190), assigned, speakers, m=2) == pytest.approx(5 / 16)


@pytest.mark.parametrize("key, value", [("start", 1.0), ("clusters", 0), ("queue_dtype", "int8"), ("ref_seconds", 0)])
def test_bad_settings_name_their_key(key, value):
    with pytest.raises(ValueError, match=f"ssps.{key}"):
        SSPSConfig(**{key: value})
