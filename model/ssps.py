"""SSPS, self-supervised positive sampling (Lepage & Dehak, 2025): an anchor's positive is another
utterance's positive-branch output, drawn from a cluster near the anchor's in embedding space,
instead of a second crop of the anchor's own utterance, which shares its channel and words.

The state, all of it in the checkpoint (`state_dict`), identical on every rank:
- the reference queue: one row per training utterance, at its stable index (manifest offset of its
  shard + position in the shard, pipeline/sources.py), holding the L2-normalised embedding of one
  clean crop (no augmentation) by the encoder in eval mode, without gradients;
- the positive queue: the positive-branch outputs (SimCLR's second view, MoCo's keys, DINO's teacher
  embeddings) of the last `queue_size` items of every rank, first in first out, with their index;
- spherical k-means centroids of the reference queue, recomputed at each epoch boundary with the
  ranks splitting the rows (model/cluster.py), each row's cluster and each cluster's M nearest others.

A step: `begin` embeds the reference crops and, once sampling is on, draws for each anchor one of
the M nearest other clusters (uniformly), then one positive-queue entry of that cluster (uniformly),
never the anchor's own utterance; the method passes its positive-branch outputs through
`Positives.swap`, which substitutes the drawn entries and keeps the outputs; `remember` writes both
queues after the optimizer step. An anchor with no entry of the chosen cluster in the queue keeps its
own positive, and is counted. Sampling starts at the first epoch boundary at or after `start` of
training, and the queues fill from one epoch before, so the first clustering sees a full epoch.

Memory (float32; `queue_dtype: float16` halves the reference queue, `queue_stride: s` keeps one
utterance in s in both queues): the reference queue is utterances x embedding dim x 4 bytes (VoxCeleb2's
1.09 M x 256: 1.1 GB), the positive queue queue_size x outputs x dim x 4 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxstream.model import distributed
from voxstream.model.cluster import assign, spherical_kmeans

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class SSPSConfig:
    # Defaults: sslsv's VoxCeleb2 SSPS recipe (models/ssps/voxceleb2/simclr/ssps_kmeans_25k_uni-1, commit 9a9bf49):
    # K-means with 25,000 clusters and 10 iterations, a positive from the nearest other cluster (M = 1),
    # a positive queue of 25,000 and 4-s reference crops (SSPSConfig, ssps_frame_length 64,000 samples).
    # Start late, as sslsv does (epoch 80 of 100 for DINO, 100 of 110 for SimCLR): clusters of a young model
    # hold other speakers, and on the README's VoxCeleb-shaped corpus a start at 0.5 lost to SimCLR, 0.75 won.
    enabled: bool = False
    start: float = 0.8            # fraction of training before positives are sampled (rounded up to an epoch)
    clusters: int = 25000         # K of the k-means over the reference queue
    iterations: int = 10          # k-means iterations at each epoch boundary
    neighbours: int = 1           # M: the positive comes from one of the M nearest other clusters
    queue_size: int = 25000       # positive queue entries (items of all ranks)
    ref_seconds: float = 4.0      # the clean reference crop of every item
    queue_dtype: str = "float32"  # float16 halves the reference queue's memory
    queue_stride: int = 1         # one utterance in `queue_stride` (by index) enters the queues

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < 1.0:
            raise ValueError(f"ssps.start: a fraction of training in [0, 1), got {self.start}")
        for name in ("clusters", "iterations", "neighbours", "queue_size", "queue_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"ssps.{name}: must be at least 1, got {getattr(self, name)}")
        if self.ref_seconds <= 0:
            raise ValueError(f"ssps.ref_seconds: must be positive, got {self.ref_seconds}")
        if self.queue_dtype not in DTYPES:
            raise ValueError(f"ssps.queue_dtype: expected one of {', '.join(DTYPES)}, got {self.queue_dtype!r}")


def sampling_step(cfg: SSPSConfig, steps_per_epoch: int, total_steps: int) -> int:
    """The first step that samples positives: the first epoch boundary at or after `start` of training."""
    epochs = -(-round(cfg.start * total_steps) // steps_per_epoch)
    return epochs * steps_per_epoch


class Positives:
    """One step's draw: which positive-queue entry replaces each anchor's positive (`rows`, -1: none).

    A plain class, not a dataclass: DDP copies dataclass arguments of forward, and the outputs that
    `swap` records must reach `SSPS.remember`.
    """

    def __init__(self, indices: torch.Tensor, ref: torch.Tensor, groups: torch.Tensor, speakers: torch.Tensor,
                 rows: torch.Tensor | None, queue: torch.Tensor | None):
        self.indices, self.ref, self.groups, self.speakers = indices, ref, groups, speakers
        self.rows, self.queue = rows, queue
        self.outputs: list[torch.Tensor] = []

    def swap(self, z: torch.Tensor) -> torch.Tensor:
        """The positive-branch output z [B, D'] (the method's next one) with drawn rows substituted."""
        slot = len(self.outputs)
        self.outputs.append(z.detach())
        if self.rows is None:
            return z
        drawn = self.queue[self.rows.clamp(min=0), slot].to(z.dtype)
        return torch.where((self.rows >= 0)[:, None], drawn, z)


class SSPS:
    """The queues, clusters and schedule of one training run (see the module docstring)."""

    def __init__(self, cfg: SSPSConfig, utterances: int, dim: int, steps_per_epoch: int, total_steps: int,
                 device: torch.device):
        self.cfg, self.device, self.steps_per_epoch = cfg, device, steps_per_epoch
        self.start_step = sampling_step(cfg, steps_per_epoch, total_steps)
        self.fill_step = max(0, self.start_step - steps_per_epoch)
        rows = -(-utterances // cfg.queue_stride)
        # One extra row at the end takes the writes of items that stay out of the queue (index -1,
        # or not a multiple of the stride), so writing never needs a data-dependent shape.
        self.ref = torch.zeros(rows + 1, dim, dtype=DTYPES[cfg.queue_dtype], device=device)
        self.filled = torch.zeros(rows + 1, dtype=torch.bool, device=device)
        self.assignment = torch.full((rows + 1,), -1, dtype=torch.long, device=device)
        self.centroids = torch.zeros(0, dim, device=device)
        self.nearest = torch.zeros(0, cfg.neighbours, dtype=torch.long, device=device)
        self.queue: torch.Tensor | None = None  # [queue_size, outputs, D'], made at the first write
        self.queue_index = torch.full((cfg.queue_size,), -1, dtype=torch.long, device=device)
        self.queue_group = torch.zeros(cfg.queue_size, dtype=torch.long, device=device)
        self.queue_speaker = torch.zeros(cfg.queue_size, dtype=torch.long, device=device)
        self.queue_ptr = 0  # host counters: how far the FIFO has been written, clusters in use
        self.clusters = 0
        self.anchors = torch.zeros((), dtype=torch.long, device=device)  # totals since sampling began
        self.found = torch.zeros((), dtype=torch.long, device=device)

    # -- a step -------------------------------------------------------------------------------------

    def begin(self, step: int, encoder: nn.Module, reference: torch.Tensor, indices: torch.Tensor,
              groups: torch.Tensor, speakers: torch.Tensor) -> Positives:
        """Embed the reference crops; at an epoch boundary once sampling is on, cluster first; draw positives."""
        if step >= self.start_step and (step - self.start_step) % self.steps_per_epoch == 0:
            self.recluster()
        ref = embed_clean(encoder, reference) if step >= self.fill_step else reference.new_zeros(len(reference), 0)
        sampling = step >= self.start_step and self.queue is not None and len(self.centroids) > 1
        rows = self.draw(indices, ref) if sampling else None
        if rows is not None:
            self.anchors += len(rows)
            self.found += (rows >= 0).sum()
        return Positives(indices, ref, groups, speakers, rows, self.queue)

    @torch.no_grad()
    def draw(self, indices: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """For each anchor, a positive-queue row from one of the M clusters nearest its own (-1: none)."""
        own = self._cluster_of(indices)
        live = assign(ref.float(), self.centroids)[0]  # utterances the last clustering did not see
        own = torch.where(own >= 0, own, live)
        pick = torch.randint(self.cfg.neighbours, (len(indices),), device=indices.device)
        target = self.nearest[own, pick]
        entries = self._cluster_of(self.queue_index)
        candidate = (entries[None, :] == target[:, None]) & (self.queue_index[None, :] != indices[:, None])
        score = torch.rand(candidate.shape, device=indices.device).masked_fill_(~candidate, -1.0)
        return torch.where(candidate.any(dim=1), score.argmax(dim=1), -1)

    def stats(self, positives: Positives) -> dict[str, torch.Tensor]:
        """Monitoring (metadata groups and speakers are never used for training): the share of anchors
        given a sampled positive, the clusters in use and, of the sampled positives, the share from the
        anchor's own group (session, or pseudo-label) and, of those whose metadata names a speaker (id 0:
        none), from its speaker. The same keys at every step and on every rank: the trainer all-reduces them."""
        zero = torch.zeros((), device=self.device)
        out = {"ssps_sampled": zero, "ssps_clusters": zero + self.clusters, "ssps_same_group": zero,
               "ssps_same_speaker": zero}
        if positives.rows is None:
            return out
        hit = positives.rows >= 0
        named = hit & (positives.speakers != 0)
        rows = positives.rows.clamp(min=0)
        out["ssps_sampled"] = hit.float().mean()
        out["ssps_same_group"] = ((self.queue_group[rows] == positives.groups) & hit).sum() / hit.sum().clamp(min=1)
        out["ssps_same_speaker"] = ((self.queue_speaker[rows] == positives.speakers) & named).sum() / \
            named.sum().clamp(min=1)
        return out

    @torch.no_grad()
    def remember(self, step: int, positives: Positives) -> None:
        """Write this step's reference embeddings and positive-branch outputs of every rank into the queues."""
        if step < self.fill_step:
            return
        indices = distributed.gather(positives.indices)
        rows = self._row_of(indices)
        self.ref[rows] = distributed.gather(positives.ref).to(self.ref.dtype)
        self.filled[rows] = True
        self.filled[-1] = False
        outputs = distributed.gather(torch.stack(positives.outputs, dim=1))
        if self.queue is None:
            self.queue = torch.zeros(self.cfg.queue_size, *outputs.shape[1:], dtype=outputs.dtype, device=self.device)
        at = (self.queue_ptr + torch.arange(len(indices), device=self.device)) % self.cfg.queue_size
        self.queue[at] = outputs.to(self.queue.dtype)
        self.queue_index[at] = indices
        self.queue_group[at] = distributed.gather(positives.groups)
        self.queue_speaker[at] = distributed.gather(positives.speakers)
        self.queue_ptr = (self.queue_ptr + len(indices)) % self.cfg.queue_size

    # -- clustering ---------------------------------------------------------------------------------

    @torch.no_grad()
    def recluster(self) -> None:
        """Spherical k-means over the filled reference rows, each rank iterating over its share of them."""
        rows = self.filled.nonzero().squeeze(1)
        if len(rows) < 2:
            return
        k = min(self.cfg.clusters, len(rows))
        x = self.ref[rows].float()
        mine = slice(distributed.rank(), None, distributed.world_size())
        # Seeds chosen by a fixed hash of the row (a Weyl sequence), whatever the number of ranks.
        priority = torch.frac(rows.double() * 0.6180339887498949)
        self.centroids, _ = spherical_kmeans(x[mine], k, self.cfg.iterations, priority=priority[mine])
        labels = assign(x, self.centroids)[0]
        self.assignment.fill_(-1)
        self.assignment[rows] = labels
        self.nearest = nearest_others(self.centroids, self.cfg.neighbours)
        self.clusters = int((torch.bincount(labels, minlength=k) > 0).sum())

    def _row_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Reference-queue row of each index; the spare last row for those that stay out of the queue."""
        stride, spare = self.cfg.queue_stride, len(self.ref) - 1
        kept = (indices >= 0) & (indices % stride == 0) & (indices // stride < spare)
        return torch.where(kept, indices // stride, spare)

    def _cluster_of(self, indices: torch.Tensor) -> torch.Tensor:
        return self.assignment[self._row_of(indices)]  # the spare row is never assigned: -1

    # -- checkpoint ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in _STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in _STATE:
            value = state[name]
            setattr(self, name, value.to(self.device) if isinstance(value, torch.Tensor) else value)


_STATE = ("ref", "filled", "assignment", "centroids", "nearest", "queue", "queue_index", "queue_group",
          "queue_speaker", "queue_ptr", "clusters", "anchors", "found")


@torch.no_grad()
def embed_clean(encoder: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """L2-normalised embeddings of un-augmented crops by the encoder in eval mode (BatchNorm's running
    statistics, no dropout), without gradients; the encoder's modes are restored after."""
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    try:
        return F.normalize(encoder(crops).float(), dim=1)
    finally:
        for module, mode in modes:
            module.train(mode)


@torch.no_grad()
def nearest_others(centroids: torch.Tensor, m: int) -> torch.Tensor:
    """[K, m] the m most similar other centroids of each centroid (itself when K <= m), in blocks of
    rows that keep the similarity block under 2**26 floats (256 MB; K = 25,000 takes 2,684 rows a block)."""
    k = len(centroids)
    block = max(1, (1 << 26) // k)
    out = torch.empty(k, m, dtype=torch.long, device=centroids.device)
    for start in range(0, k, block):
        sim = centroids[start:start + block] @ centroids.T
        rows = torch.arange(start, min(start + block, k), device=centroids.device)
        if k > 1:
            sim[torch.arange(len(rows)), rows] = float("-inf")
        best = sim.topk(min(m, k), dim=1).indices
        out[start:start + block] = best[:, torch.arange(m, device=best.device) % best.shape[1]]
    return out


def positive_share(centroids: torch.Tensor, assigned: np.ndarray, reference: np.ndarray, m: int = 1) -> float:
    """Of the positives SSPS would draw from these clusters (a uniform member of one of the m clusters
    nearest the anchor's own), the expected share whose `reference` label (speaker, session) is the
    anchor's. Offline monitoring, to size `clusters` on data with labels; anchors whose drawn clusters
    are all empty are left out, as the trainer leaves them their own positive."""
    near = nearest_others(centroids, m).cpu().numpy()[assigned]        # [N, m] the clusters drawn from
    ref = np.unique(reference, return_inverse=True)[1].astype(np.int64)
    width = int(ref.max()) + 1
    # (cluster, label) counts, sparse: K x labels is too big to hold at VoxCeleb scale.
    pairs, counts = np.unique(assigned.astype(np.int64) * width + ref, return_counts=True)
    query = near * width + ref[:, None]
    at = np.searchsorted(pairs, query).clip(max=len(pairs) - 1)
    same = np.where(pairs[at] == query, counts[at], 0)
    size = np.bincount(assigned, minlength=len(centroids))[near]
    drawn = size > 0
    share = (same / np.maximum(size, 1)).sum(axis=1) / np.maximum(drawn.sum(axis=1), 1)
    return float(share[drawn.any(axis=1)].mean())
