"""Write a run's report (report.png curves, report.md verdict, evaluation table and recipe) into its folder.

    python tools/report.py RUN [--eval metrics.json ...]

RUN is a run folder (path or bucket URL) holding metrics.jsonl and checkpoints. Evaluations found at
RUN/*/metrics.json are included, and any given with --eval. The trainer writes the same report when
training completes. Prints the verdict: learned, collapsed, or did not learn.
"""
from __future__ import annotations

import argparse
import json
import sys

from voxstream.model.report import write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder (train.out_dir), a path or URL")
    p.add_argument("--eval", nargs="*", default=[], help="metrics.json files written by tools/evaluate.py")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    args = p.parse_args(argv)
    try:
        state, url = write_report(args.run, args.eval, args.storage_options)
    except (FileNotFoundError, ValueError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(f"{url}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
