"""Turn audio corpora into WebDataset shards on any fsspec URL, and verify shard sets.

    python tools/make_shards.py voxceleb     --root DIR --out URL [--exclude-speakers TRIALS]
    python tools/make_shards.py musan        --root DIR --out URL
    python tools/make_shards.py rir          --root DIR --out URL
    python tools/make_shards.py simulate-rir --count N --out URL
    python tools/make_shards.py folder       --root DIR --out URL [--pattern REGEX] [--max-duration S]
    python tools/make_shards.py regroup      --in URL --labels FILE --out URL
    python tools/make_shards.py verify URL

On several machines, each corpus subcommand runs as part i of n (`--part i/n`, for job arrays; under
torchrun RANK/WORLD_SIZE give it, and rank 0 finalizes once every part has finished), then once
with `--finalize n`: the result equals a one-machine run's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path


from voxstream.shards import corpora
from voxstream.shards.regroup import regroup
from voxstream.shards.storage import NETWORK, Retry
from voxstream.shards.verify import verify
from voxstream.shards.format import MANIFEST
from voxstream.shards.storage import exists, join
from voxstream.shards.writer import WriteConfig, finalize_parts, part_url, write_shards


def _size(text: str) -> int:
    """Bytes, with an optional k/M/G suffix (powers of 1024)."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip().lower().removesuffix("b")
    scale = units.get(text[-1:], 1)
    value = int(float(text[:-1] if scale > 1 else text) * scale)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return value


def _part(text: str) -> tuple[int, int]:
    try:
        part, parts = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= part < parts:
        raise argparse.ArgumentTypeError(f"{text!r}: needs 0 <= I < N")
    return part, parts


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of parts >= 1")
    return int(text)


def _options(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workers", type=int, default=1, help="encoding processes")
    common.add_argument("--storage-options", type=_options, default={}, help="fsspec options as JSON")
    writing = argparse.ArgumentParser(add_help=False, parents=[common])
    writing.add_argument("--out", required=True, help="destination URL (path, file://, s3://, ...)")
    writing.add_argument("--shard-size", type=_size, default=256 * 2**20, help="bytes per shard (256M)")
    writing.add_argument("--seed", type=int, default=0, help="seed of the global group shuffle")
    writing.add_argument("--resume", action="store_true", help="keep finished shards of an interrupted run")
    writing.add_argument("--prefix", default="", help="shard name prefix (default: the corpus name)")
    writing.add_argument("--retry-attempts", type=int, default=Retry.attempts,
                         help="tries in all at writing a shard before giving up (%(default)s)")
    writing.add_argument("--retry-backoff", type=float, default=Retry.backoff,
                         help="seconds before the first retry, doubled for each next one (%(default)s)")

    def add(name: str, help: str, min_duration: float, root: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[writing], help=help)
        if root:
            p.add_argument("--root", required=True, help="source directory")
        p.add_argument("--min-duration", type=float, default=min_duration, help="reject shorter inputs (s)")
        p.add_argument("--corpus", help="corpus name in keys and metadata")
        split = p.add_mutually_exclusive_group()
        split.add_argument("--part", type=_part, metavar="I/N", help="write only part I of N of the plan "
                           "(one task of a job array; under torchrun RANK/WORLD_SIZE)")
        split.add_argument("--finalize", type=_positive, metavar="N", help="assemble the N finished parts")
        return p

    add("voxceleb", "VoxCeleb1/2: <id>/<video>/<n>.wav|m4a", 0.5).add_argument(
        "--exclude-speakers", action="append", default=[], metavar="FILE",
        help="speaker list or trial list whose speakers are left out (repeatable)")
    add("musan", "MUSAN music/noise/speech", 0.5)
    add("rir", "RIRS_NOISES-style RIR folders", 0.0)
    sim = add("simulate-rir", "pyroomacoustics shoebox RIRs, Kaldi style", 0.0, root=False)
    sim.add_argument("--count", type=int, required=True, help="number of RIRs")
    sim.add_argument("--per-room", type=int, default=10, help="RIRs per simulated room")
    folder = add("folder", "any tree of wav/flac/ogg/mp3", 0.5)
    folder.add_argument("--pattern", help="regex with named groups speaker, session (and utt) on the relative path")
    folder.add_argument("--max-duration", type=float, default=30.0, help="cut longer files at quiet points (s)")
    regroup = sub.add_parser("regroup", parents=[writing],
                             help="rewrite a shard set with each pseudo-speaker's utterances together")
    regroup.add_argument("--in", dest="source", required=True, help="the shard set to regroup")
    regroup.add_argument("--labels", required=True, help="labels file made for that set (pseudo_label.py)")
    check = sub.add_parser("verify", parents=[common], help="re-read every sample and check the manifest")
    check.add_argument("url")
    return parser


def listing(args: argparse.Namespace) -> corpora.Listing:
    named = {"corpus": args.corpus} if args.corpus else {}
    if args.command == "voxceleb":
        return corpora.voxceleb(args.root, args.exclude_speakers, **named)
    if args.command == "musan":
        return corpora.musan(args.root, **named)
    if args.command == "rir":
        return corpora.rir(args.root, **named)
    if args.command == "simulate-rir":
        return corpora.simulated_rirs(args.count, args.per_room, args.seed, **named)
    return corpora.folder(args.root, args.pattern, **named)


def run_verify(args: argparse.Namespace) -> int:
    report = verify(args.url, args.storage_options, args.workers)
    for problem in report.problems[:50]:
        print(problem)
    if len(report.problems) > 50:
        print(f"... and {len(report.problems) - 50} more problems")
    verdict = "ok" if report.ok else f"FAILED, {len(report.problems)} problems"
    print(f"verify {args.url}: {verdict}: {report.shards} shards, {report.samples} samples, "
          f"{report.seconds / 3600:.2f} h")
    return 0 if report.ok else 1


def write_config(args: argparse.Namespace) -> WriteConfig:
    return WriteConfig(out=args.out, prefix=args.prefix, shard_size=args.shard_size, seed=args.seed,
                       workers=args.workers, min_duration=getattr(args, "min_duration", 0.0),
                       max_duration=getattr(args, "max_duration", None), resume=args.resume,
                       storage_options=args.storage_options, retry=Retry(args.retry_attempts, args.retry_backoff))


def run_regroup(args: argparse.Namespace) -> int:
    manifest = regroup(args.source, args.labels, write_config(args))
    p = manifest.params
    print(f"{manifest.corpus}: {len(manifest.shards)} shards, {manifest.samples} samples of "
          f"{p['pseudo_speakers']} pseudo-speakers in {args.out}; {p['unlabeled']} unlabeled kept their group")
    return 0


def torchrun_part() -> tuple[int, int] | None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ["RANK"]), world) if world > 1 else None


def run_write(args: argparse.Namespace) -> int:
    cfg, part = write_config(args), getattr(args, "part", None) or torchrun_part()
    if getattr(args, "finalize", None):
        manifest, rejected = finalize_parts(listing(args), cfg, args.finalize)
    elif part:
        manifest, rejected = write_shards(listing(args), cfg, part)
        print(f"part {part[0]}/{part[1]}: {len(manifest.shards)} shards, {manifest.samples} samples in "
              f"{part_url(args.out, *part)}")
        if getattr(args, "part", None) or part[0] != 0:
            return 0
        for i in range(part[1]):  # torchrun's rank 0 finalizes once every rank's part is finished
            while not exists(join(part_url(args.out, i, part[1]), MANIFEST), args.storage_options):
                time.sleep(2.0)
        manifest, rejected = finalize_parts(listing(args), cfg, part[1])
    else:
        manifest, rejected = write_shards(listing(args), cfg)
    print(f"{manifest.corpus}: {len(manifest.shards)} shards, {manifest.samples} samples, "
          f"{manifest.seconds / 3600:.2f} h in {args.out}; {len(rejected)} inputs rejected")
    for reason, n in Counter(r["reason"].split(":")[0] for r in rejected).most_common():
        print(f"  rejected {n}: {reason} (see {args.out.rstrip('/')}/rejected.jsonl)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "workers", 1) < 1:
        return _fail(f"--workers {args.workers}: must be at least 1")
    if getattr(args, "retry_attempts", 1) < 1 or getattr(args, "retry_backoff", 0) < 0:
        return _fail(f"--retry-attempts {args.retry_attempts} must be at least 1 "
                     f"and --retry-backoff {args.retry_backoff} at least 0")
    try:
        run = {"verify": run_verify, "regroup": run_regroup}.get(args.command, run_write)
        return run(args)
    except corpora.BadInput as e:
        return _fail(str(e))
    except (OSError, *NETWORK) as e:  # storage unreachable, disk full...: finished shards stay, --resume continues
        return _fail(f"{e}{'' if args.command == 'verify' else '; rerun with --resume to continue'}", code=1)


def _fail(message: str, code: int = 2) -> int:
    print(f"make_shards.py: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
