"""Train beyond same-utterance positives in one command: SSL -> pseudo-labels -> rounds -> evaluation.

    python tools/chain.py --config configs/chain_demo.yaml --out RUN [section.key=value ...]

Each stage runs the existing tool (train.py under torchrun when common.nproc > 1, pseudo_label.py,
evaluate.py) and writes into RUN; rerunning the same command skips the complete stages and resumes
the one that was stopped (model/chain.py has the layout). SIGTERM stops the running stage too
(training saves a checkpoint first). Prints a summary table, also written to RUN/summary.json.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from voxstream.model.chain import ChainError, load_chain, run_chain
from voxstream.model.recipe import RecipeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="chain recipe YAML (configs/chain_demo.yaml)")
    parser.add_argument("--out", required=True, help="run folder: every stage's output, and summary.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="chain recipe overrides, e.g. rounds.count=1")
    args = parser.parse_intermixed_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # the running stage is stopped too
    try:
        run_chain(load_chain(args.config, args.overrides), Path(args.out).resolve())
    except (RecipeError, ChainError, OSError) as e:
        print(f"chain: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, RecipeError) else 1
    except KeyboardInterrupt:  # Ctrl-C reached the stage too; a rerun resumes it
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
