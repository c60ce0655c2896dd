"""Pseudo-speaker labels for a shard set: embed every utterance with a trained model, cluster, write labels.

Three stages, each resumable:
1. every rank embeds its share of the shards (shard i goes to rank i % world) into one
   `<work>/emb/<shard>.npz` per shard (keys, embeddings, speakers, groups), each written atomically, so a
   rerun skips the shards already done;
2. spherical k-means over every rank's embeddings, each rank holding only its own (model/cluster.py),
   then AHC on the centroids down to the wanted number of pseudo-speakers;
3. rank 0 writes the labels file (shards/labels.py) with the settings and statistics: cluster
   sizes and, when the metadata names speakers, NMI and purity against them, and the share of the
   positives SSPS would draw from the k-means clusters (model/ssps.positive_share) that share the
   anchor's speaker and group (session): `ssps_same_speaker`, `ssps_same_group`, the names of
   SSPS's own monitors in training. The metadata is for monitoring only: the labels never see it.
"""
from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from voxstream.model import distributed
from voxstream.model.cluster import ahc, nmi, purity, spherical_kmeans
from voxstream.model.embeddings import EmbedOptions, extract
from voxstream.model.ssps import positive_share
from voxstream.shards import storage
from voxstream.shards.format import SAMPLE_RATE, decode_audio, iter_samples, read_manifest, shard_urls
from voxstream.shards.labels import stable_hash, write_labels


@dataclass
class PseudoLabelConfig:
    shards: str                     # the shard set to label
    out: str                        # the labels file to write (e.g. beside the set, or in a run folder)
    work: str                       # folder for the per-shard embeddings (the resumable part)
    kmeans: int = 1000              # k-means clusters
    clusters: int = 0               # pseudo-speakers after AHC on the centroids; 0: the k-means clusters
    iterations: int = 20            # k-means iterations
    seed: int = 0
    device: str = "cpu"
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    storage_options: dict = field(default_factory=dict)


def _my_shards(cfg: PseudoLabelConfig) -> list[str]:
    """The names of this rank's share of the shards: shard i goes to rank i % world."""
    names = [s["name"] for s in read_manifest(cfg.shards, cfg.storage_options).shards]
    return names[distributed.rank()::distributed.world_size()]


def _emb_url(cfg: PseudoLabelConfig, shard: str) -> str:
    return storage.join(cfg.work, "emb", f"{shard}.npz")


def _shard_embeddings(embedder: nn.Module, cfg: PseudoLabelConfig, shard: str) -> tuple[bytes, int, float]:
    """(npz bytes, utterances, audio seconds) of one shard's embeddings."""
    speakers: dict[str, str] = {}
    groups: dict[str, str] = {}
    seconds = 0.0

    def audio():
        nonlocal seconds
        for key, meta, flac in iter_samples(storage.join(cfg.shards, shard), cfg.storage_options):
            speakers[key] = str(meta.get("speaker") or "")
            groups[key] = str(meta.get("group") or "")
            wave = decode_audio(flac).astype(np.float32) / 32768.0
            seconds += len(wave) / SAMPLE_RATE
            yield key, wave

    keys, embeddings = [], []
    for ids, z in extract(embedder, audio(), cfg.embed, cfg.device):
        keys += ids
        embeddings.append(z.astype(np.float32))
    buf = io.BytesIO()
    np.savez(buf, keys=np.array(keys, dtype=str), emb=np.concatenate(embeddings),
             speakers=np.array([speakers[k] for k in keys], dtype=str),
             groups=np.array([groups[k] for k in keys], dtype=str))
    return buf.getvalue(), len(keys), seconds


def embed_shards(embedder: nn.Module, cfg: PseudoLabelConfig) -> dict:
    """Stage 1 for this rank's shards; returns its throughput (shards already done are skipped)."""
    rank, world = distributed.rank(), distributed.world_size()
    shards = _my_shards(cfg)
    if not shards:
        raise ValueError(f"{cfg.shards}: fewer shards than the {world} ranks")
    todo = [s for s in shards if not storage.exists(_emb_url(cfg, s), cfg.storage_options)]
    embedder.eval().to(cfg.device)
    wall, cpu, count, seconds = time.perf_counter(), time.process_time(), 0, 0.0
    for shard in tqdm(todo, desc=f"embedding (rank {rank})", unit="shard", disable=rank != 0, dynamic_ncols=True):
        data, n, s = _shard_embeddings(embedder, cfg, shard)
        storage.write_bytes(_emb_url(cfg, shard), data, cfg.storage_options)
        count, seconds = count + n, seconds + s
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"shards": len(shards), "embedded": len(todo), "utterances": count, "audio_seconds": round(seconds, 1),
            "utt_per_s": round(count / wall, 2) if count else None,
            "utt_per_cpu_s": round(count / cpu, 2) if count else None}


def _load(cfg: PseudoLabelConfig) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """This rank's share of the stage-1 embeddings: (keys, [N, D], speakers, groups)."""
    keys, emb, speakers, groups = [], [], [], []
    for shard in _my_shards(cfg):
        with np.load(io.BytesIO(storage.read_bytes(_emb_url(cfg, shard), cfg.storage_options))) as f:
            keys += f["keys"].tolist()
            emb.append(f["emb"])
            speakers += f["speakers"].tolist()
            # Work folders written before groups were kept have none: no group share then.
            groups += f["groups"].tolist() if "groups" in f.files else [""] * len(f["keys"])
    return keys, np.concatenate(emb), speakers, groups


def _statistics(labels: np.ndarray, speakers: list[str], groups: list[str], centroids: torch.Tensor,
                assigned: np.ndarray) -> dict:
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    stats = {"utterances": len(labels), "clusters": len(sizes), "singletons": int((sizes == 1).sum()),
             "size_min": int(sizes.min()), "size_median": float(np.median(sizes)), "size_max": int(sizes.max())}
    # Monitoring only: the metadata's speakers and groups never reach the labels.
    if all(speakers):
        reference = np.array(speakers)
        stats.update(speakers=len(np.unique(reference)), nmi=round(nmi(labels, reference), 4),
                     purity=round(purity(labels, reference), 4),
                     ssps_same_speaker=round(positive_share(centroids, assigned, reference), 4))
    if all(groups):
        stats["ssps_same_group"] = round(positive_share(centroids, assigned, np.array(groups)), 4)
    return stats


def cluster_and_write(cfg: PseudoLabelConfig) -> dict | None:
    """Stages 2 and 3; every rank takes part, rank 0 writes and returns the statistics."""
    keys, emb, speakers, groups = _load(cfg)
    started = time.perf_counter()
    x = F.normalize(torch.from_numpy(emb).to(cfg.device), dim=1)
    # Priorities from the keys: the same clusters whatever the number of ranks and their shares.
    priority = torch.tensor([stable_hash(f"{cfg.seed}:{k}") / 2.0 ** 63 for k in keys], dtype=torch.float64)
    centroids, assigned = spherical_kmeans(x, cfg.kmeans, cfg.iterations, priority)
    assigned = assigned.cpu().numpy()
    merged = ahc(centroids, cfg.clusters) if cfg.clusters else np.arange(cfg.kmeans)
    labels = merged[assigned]
    seconds = time.perf_counter() - started
    mine = (keys, labels, speakers, groups, assigned)
    parts = [mine]
    if distributed.is_dist():
        parts = [None] * distributed.world_size()
        dist.all_gather_object(parts, mine)
    if distributed.rank() != 0:
        return None
    keys, speakers, groups = ([x for p in parts for x in p[i]] for i in (0, 2, 3))
    labels, assigned = (np.concatenate([p[i] for p in parts]) for i in (1, 4))
    stats = {**_statistics(labels, speakers, groups, centroids, assigned), "cluster_seconds": round(seconds, 2)}
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("storage_options", "device")}
    write_labels(cfg.out, keys, labels, _info("pseudo-speakers", cfg.shards, settings, stats, cfg.storage_options),
                 cfg.storage_options)
    return stats


def metadata_labels(shards: str, out: str, field: str = "speaker", storage_options: dict | None = None) -> dict:
    """A labels file from the metadata's `field` (the speaker): the supervised baseline takes the same
    path as pseudo-labels. Utterances without the field are left unlabeled."""
    keys, names = [], []
    for shard in shard_urls(shards, storage_options):
        for sample in iter_samples(shard, storage_options):
            if sample.meta.get(field):
                keys.append(sample.key)
                names.append(str(sample.meta[field]))
    if not keys:
        raise ValueError(f"{shards}: no sample has metadata field {field!r}")
    classes, labels = np.unique(names, return_inverse=True)
    stats = {"utterances": len(keys), "clusters": len(classes)}
    write_labels(out, keys, labels, _info(f"metadata {field}", shards, {"field": field}, stats, storage_options),
                 storage_options)
    return stats


def _info(kind: str, shards: str, settings: dict, stats: dict, storage_options: dict | None) -> dict:
    """What a labels file says about itself: the shards it describes (checked when it is joined)."""
    manifest = read_manifest(shards, storage_options)
    return {"kind": kind, "shards": shards, "set": [{"name": s["name"], "sha256": s.get("sha256")} for s in manifest.shards],
            "settings": settings, "statistics": stats}
