"""Pseudo-speaker labels for a shard set from a trained checkpoint (embed, k-means + AHC, labels file).

    [torchrun --nproc_per_node=N] tools/pseudo_label.py --checkpoint CKPT --shards URL --out LABELS.npz \
        --work DIR [--kmeans K] [--clusters T] [--iterations I]
    tools/pseudo_label.py --from-metadata speaker --shards URL --out LABELS.npz   # real labels: the supervised baseline

Under torchrun each rank embeds its share of the shards and clusters its own embeddings (the
centroids are shared by all-reduce). Rerunning with the same --work skips the shards already
embedded. Prints the statistics written into the labels file (NMI and purity when the metadata names
speakers: monitoring only).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from voxstream.model.embeddings import EmbedOptions
from voxstream.model.evaluate import load_embedder
from voxstream.model.pseudo_labels import PseudoLabelConfig, cluster_and_write, embed_shards, metadata_labels
from voxstream.model import distributed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint URL written by tools/train.py")
    source.add_argument("--from-metadata", metavar="FIELD", help="label by this metadata field (e.g. speaker) instead")
    p.add_argument("--shards", required=True, help="shard set URL to label")
    p.add_argument("--out", required=True, help="labels file URL to write (.npz)")
    p.add_argument("--work", help="folder URL for per-shard embeddings (resumable; needed with --checkpoint)")
    p.add_argument("--kmeans", type=int, default=1000, help="k-means clusters")
    p.add_argument("--clusters", type=int, default=0, help="pseudo-speakers after AHC (0: no AHC)")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crops", type=int, default=0,
                   help="mean of N fixed crops per utterance (default: the whole utterance); equal lengths fill "
                        "every batch, where whole utterances batch only with others of their length")
    p.add_argument("--crop-seconds", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=32, help="waveforms per forward pass")
    p.add_argument("--workers", type=int, default=4, help="audio decoding threads")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    args = p.parse_args(argv)
    if args.checkpoint and not args.work:
        p.error("--checkpoint needs --work")
    if args.kmeans < 1 or args.clusters < 0 or args.clusters > args.kmeans or args.iterations < 1:
        p.error("need --kmeans >= 1, 0 <= --clusters <= --kmeans and --iterations >= 1")
    if args.crops < 0 or args.crop_seconds <= 0:
        p.error("need --crops >= 0 and --crop-seconds > 0")
    return args


def label(args: argparse.Namespace) -> dict | None:
    """Write the labels file; its statistics (on rank 0; None on the other ranks)."""
    if args.from_metadata:
        return metadata_labels(args.shards, args.out, args.from_metadata, args.storage_options)
    device, _ = distributed.setup_distributed()
    try:
        cfg = PseudoLabelConfig(shards=args.shards, out=args.out, work=args.work, kmeans=args.kmeans,
                                clusters=args.clusters, iterations=args.iterations, seed=args.seed,
                                device=str(device), storage_options=args.storage_options,
                                embed=EmbedOptions(crops=args.crops, crop_seconds=args.crop_seconds,
                                                   batch_size=args.batch_size, workers=args.workers))
        embedder, _ = load_embedder(args.checkpoint, storage_options=args.storage_options)
        speed = embed_shards(embedder, cfg)
        stats = cluster_and_write(cfg)
        return None if stats is None else {"embedding": speed, **stats}
    finally:
        if distributed.is_dist():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = label(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"pseudo_label: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if stats is not None:
        print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
