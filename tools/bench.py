"""Benchmarks: `python tools/bench.py {pipeline,augment,train,gpu,all} ...`, one JSON line per figure.

Each figure is measured against its simple baseline in the same run; `gpu` is the one command for a
GPU node, its figures against the targets for one GPU (also written to one JSON file). The suites
live beside this file (bench_pipeline.py, bench_augment.py, bench_train.py, bench_gpu.py); each has
add_arguments(parser) and run(args) -> list[dict].
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

SUITES = ("pipeline", "augment", "train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    for name in (*SUITES, "gpu"):
        importlib.import_module(f"bench_{name}").add_arguments(sub.add_parser(name))
    all_parser = sub.add_parser("all", help="every suite with its defaults, one JSON file")
    all_parser.add_argument("--out", default="bench-out")
    all_parser.add_argument("--speech", help="a folder of real recordings for the pipeline suite too")
    args = parser.parse_args(argv)
    if args.suite == "all":
        return run_all(Path(args.out), args.speech)
    for row in importlib.import_module(f"bench_{args.suite}").run(args):
        print(json.dumps(row), flush=True)
    return 0


def run_all(out: Path, speech: str | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in SUITES:
        sub = argparse.ArgumentParser()
        module = importlib.import_module(f"bench_{name}")
        module.add_arguments(sub)
        for row in module.run(sub.parse_args(["--speech", speech] if speech and name == "pipeline" else [])):
            print(json.dumps(row), flush=True)
            rows.append({"suite": name, **row})
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
