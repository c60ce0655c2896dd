"""Train a recipe: `torchrun --nproc_per_node=N tools/train.py --config configs/X.yaml [key=value ...]`.

Also runs as plain `python tools/train.py ...` (one process). Multi-node: torchrun --nnodes=M
--rdzv-backend=c10d --rdzv-endpoint=HOST:PORT on every node. The newest intact checkpoint in
train.out_dir is resumed automatically (a cut-short newer one is skipped with a line); SIGTERM saves
one and exits. A mistake in the recipe or an override, or weights of another network than `model`,
is one line and exit code 2; any other failure is one line and exit code 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from voxstream.model.recipe import RecipeError, load_recipe
from voxstream.model.train import TrainingError, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                        help="resume from CKPT, or from the newest checkpoint in train.out_dir "
                             "(automatic when one exists; the flag makes a missing one an error)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. optim.lr=0.1")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --config
    try:
        train(load_recipe(args.config, args.overrides), resume=args.resume)
    except (RecipeError, TrainingError, OSError) as e:
        # One line per failing process; under torchrun every rank fails alike, so rank 0 speaks.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, RecipeError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
