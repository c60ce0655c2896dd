"""Evaluate a speaker embedder on verification trial lists: EER, minDCF, scores, DET and histograms.

    python tools/evaluate.py --checkpoint CKPT --trials FILE [FILE ...] (--audio-root DIR | --shards URL)
        [--cohort URL] [--mean-from URL] [--out DIR] [--crops N] [--batch-size B] [--device DEV]
    python tools/evaluate.py --untrained (--config configs/demo.yaml | --checkpoint CKPT) ...  # at initialisation

Trial ids are paths under --audio-root (`id10270/5r0dWxy17C8/00001.wav`) or, with --shards, name the
sample `<corpus>/id10270/5r0dWxy17C8/00001` (extension dropped, last three key parts matched).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


import torch

from voxstream.model.embeddings import EmbedOptions
from voxstream.model.evaluate import EvalConfig, check_source, evaluate, load_embedder, read_trial_lists


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint URL written by tools/train.py")
    p.add_argument("--untrained", action="store_true",
                   help="the same encoder at initialisation, for comparison (recipe from --config or --checkpoint)")
    p.add_argument("--config", help="recipe YAML (with --untrained)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (with --untrained)")
    p.add_argument("--trials", nargs="+", required=True, help="trial lists: 'label enroll test' lines")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio-root", help="folder the trial ids are relative to")
    source.add_argument("--shards", help="shard set URL holding the trial utterances")
    p.add_argument("--cohort", default="", help="shard set URL for AS-norm")
    p.add_argument("--mean-from", default="", help="shard set URL whose mean embedding is subtracted")
    p.add_argument("--set-utts", type=int, default=5000, help="utterances read from --cohort / --mean-from")
    p.add_argument("--top-n", type=int, default=300, help="AS-norm cohort size per utterance")
    p.add_argument("--out", default="eval-out")
    p.add_argument("--crops", type=int, default=0, help="mean of N fixed crops (default: whole utterance)")
    p.add_argument("--crop-seconds", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=32, help="waveforms per forward pass")
    p.add_argument("--workers", type=int, default=4, help="audio reading threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    args = p.parse_args(argv)
    if not (args.checkpoint or (args.untrained and args.config)):
        p.error("give --checkpoint, or --untrained with --config or --checkpoint")
    if args.config and not args.untrained:
        p.error("--config is only used with --untrained (a checkpoint carries its own recipe)")
    for name in ("set_utts", "top_n", "batch_size", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.crops < 0 or args.crop_seconds <= 0:
        p.error("--crops must be >= 0 and --crop-seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = EvalConfig(trials=args.trials, audio_root=args.audio_root or "", shards=args.shards or "",
                     cohort=args.cohort, mean_from=args.mean_from, set_utts=args.set_utts, top_n=args.top_n,
                     out=args.out, device=args.device, storage_options=args.storage_options,
                     embed=EmbedOptions(crops=args.crops, crop_seconds=args.crop_seconds,
                                        batch_size=args.batch_size, workers=args.workers))
    try:
        lists = read_trial_lists(cfg.trials)   # bad input stops before a model is loaded
        check_source(cfg)
        embedder, name = load_embedder(args.checkpoint or "", args.config or "", args.untrained, args.seed,
                                       args.storage_options)
        evaluate(embedder, cfg, lists, name)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
