"""Write the synthetic demo corpus (speech, MUSAN-like noise, RIRs, trials): see shards/synth/corpus.py.

    python tools/make_demo_corpus.py --out demo-out/corpus [--speakers 50 --test-speakers 20
        --sessions 3 --utterances 5 --seed 0 --workers 2]
"""
from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from voxstream.shards.synth.corpus import CorpusConfig, generate


def main(argv: list[str] | None = None) -> int:
    defaults = CorpusConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    parser.add_argument("--speakers", type=int, default=defaults.speakers, help="training speakers")
    parser.add_argument("--test-speakers", type=int, default=defaults.test_speakers,
                        help="held-out speakers, the only ones in trials.txt")
    parser.add_argument("--sessions", type=int, default=defaults.sessions, help="sessions (channels) per speaker")
    parser.add_argument("--utterances", type=int, default=defaults.utterances, help="utterances per session")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus already in --out")
    args = parser.parse_args(argv)

    cfg = CorpusConfig(speakers=args.speakers, test_speakers=args.test_speakers, sessions=args.sessions,
                       utterances=args.utterances, seed=args.seed)
    bars: list[tqdm] = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="job", desc="synthesising"))
        bars[0].update(done - bars[0].n)

    try:
        summary = generate(cfg, args.out, workers=args.workers, overwrite=args.overwrite, progress=progress)
    except (FileExistsError, ValueError) as err:
        print(f"make_demo_corpus: {err}", file=sys.stderr)
        return 2
    finally:
        for bar in bars:
            bar.close()
    print(f"{args.out}: {cfg.speakers} training + {cfg.test_speakers} test speakers, "
          f"{summary['utterances']} utterances, {summary['speech_hours']:.2f} h of speech "
          f"({summary['train_hours']:.2f} h training), {summary['musan_seconds']:.0f} s MUSAN-like, "
          f"{summary['rirs']} RIRs, {summary['trials']} trials ({summary['target_trials']} target)")
    print(f"speed: {summary['audio_seconds_per_cpu_second']:.0f} s of audio per CPU second "
          f"({summary['audio_seconds_per_wall_second_per_worker']:.0f} per wall second per worker, "
          f"{summary['wall_seconds']:.1f} s wall with {args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
