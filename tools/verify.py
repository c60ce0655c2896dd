"""Are two recordings the same speaker? Prints the cosine score and the decision.

    python tools/verify.py a.wav b.wav --checkpoint CKPT [--threshold T | --metrics metrics.json [--trial-list NAME]]

--metrics takes the threshold from tools/evaluate.py's output: the cosine EER operating point of a trial
list (the first by default). Without a threshold only the score is printed. Exit status: 0 same speaker
or no threshold, 1 different speakers, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from voxstream.model.embedder import Embedder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="first recording (any sample rate, mono or stereo)")
    p.add_argument("b", help="second recording")
    p.add_argument("--checkpoint", required=True, help="checkpoint path or URL written by tools/train.py")
    threshold = p.add_mutually_exclusive_group()
    threshold.add_argument("--threshold", type=float, help="accept when the score is at least this")
    threshold.add_argument("--metrics", default="", help="metrics.json of tools/evaluate.py (its EER threshold)")
    p.add_argument("--trial-list", default="", help="which list of --metrics (default: the first)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    args = p.parse_args(argv)
    try:
        model = Embedder.load(args.checkpoint, args.device, args.metrics, args.trial_list, args.storage_options)
        if args.threshold is not None:
            model.threshold = args.threshold
        score, same = model.verify(args.a, args.b)
    except (FileNotFoundError, ValueError) as e:
        print(f"verify: error: {e}", file=sys.stderr)
        return 2
    print(f"score {score:.4f}")
    if same is None:
        print("no threshold: give --threshold or --metrics for a decision", file=sys.stderr)
        return 0
    print(f"{'same speaker' if same else 'different speakers'} (threshold {model.threshold:.4f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
