"""`make demo`: the whole system on one machine, no GPU, no network.

synthetic corpus -> shards (speech, noise, RIRs) on a local folder or a local S3 server ->
torchrun training (2 processes, gloo) with device-side augmentation -> evaluation on held-out
speakers -> the run's report (report.md, report.png in the run folder) -> a table: trained model vs
the same encoder untrained vs the MFCC-statistics baseline.
Every step runs the real command-line tool, as a user would.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Many speakers, few utterances each: SimCLR treats every other utterance of a batch as a negative,
# and with the generator's default 50 speakers a batch of 64 is full of same-speaker negatives.
CORPUS = ["--speakers", "200", "--utterances", "3", "--test-speakers", "20"]
TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent


def step(title: str, cmd: list[str], env: dict) -> None:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    print(f"   ({time.time() - t0:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="working folder (corpus, shards, runs)")
    parser.add_argument("--store", choices=["local", "s3"], default="local")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides for training")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with store(args.store, out) as (base, env):
        run(out, base, env, args)
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    return 0


@contextlib.contextmanager
def store(kind: str, out: Path):
    """(shard base URL, environment for the tools): a local folder, or a SeaweedFS S3 server."""
    env = dict(os.environ)
    if kind == "local":
        yield str(out / "store"), env
        return
    from voxstream.shards.locals3 import local_s3
    with local_s3(bucket="demo", data_dir=str(out / "s3")) as s3:
        yield f"s3://{s3.bucket}", {**env, **s3.env}


def run(out: Path, base: str, env: dict, args) -> None:
    py = sys.executable
    corpus = out / "corpus"
    if not (corpus / "corpus.json").exists():  # written last: a complete corpus
        step("synthetic corpus", [py, "tools/make_demo_corpus.py", "--out", str(corpus), "--seed", str(args.seed),
                                   "--workers", "2", "--overwrite", *CORPUS], env)
    shards = {"speech": f"{base}/speech", "noise": f"{base}/musan", "rir": f"{base}/rirs"}
    shard = [py, "tools/make_shards.py"]
    common = ["--workers", "2", "--seed", str(args.seed), "--shard-size", "20000000", "--resume"]
    step("shard speech (trial speakers excluded)", shard + ["voxceleb", "--root", str(corpus / "wav"), "--out",
         shards["speech"], "--exclude-speakers", str(corpus / "trials.txt")] + common, env)
    step("shard noise", shard + ["musan", "--root", str(corpus / "musan"), "--out", shards["noise"]] + common, env)
    step("shard RIRs", shard + ["rir", "--root", str(corpus / "rirs"), "--out", shards["rir"]] + common, env)

    run_dir = f"{base}/run"   # checkpoints live in the store too: on S3 with STORE=s3
    step(f"train (torchrun, {args.nproc} processes)",
         [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "tools/train.py",
          "--config", "configs/demo.yaml", f"data.train={shards['speech']}", f"augment.noise={shards['noise']}",
          f"augment.rir={shards['rir']}", f"train.out_dir={run_dir}", *args.overrides], env)

    trials = str(corpus / "trials.txt")
    audio = ["--trials", trials, "--audio-root", str(corpus / "wav")]
    step("evaluate the trained model", [py, "tools/evaluate.py", "--checkpoint", f"{run_dir}/last.pt", *audio,
                                        "--out", str(out / "eval-trained")], env)
    step("evaluate the untrained encoder", [py, "tools/evaluate.py", "--untrained", "--config", "configs/demo.yaml",
                                            *audio, "--out", str(out / "eval-untrained")], env)
    step("the run's report, with its evaluation", [py, "tools/report.py", run_dir,
                                                   "--eval", str(out / "eval-trained" / "metrics.json")], env)
    table(out, trials, corpus / "wav")


def table(out: Path, trials: str, audio_root: Path) -> None:
    from voxstream.model.baseline import score_trials
    from voxstream.model.metrics import eer, min_dcf

    scores, labels, _ = score_trials(trials, audio_root)
    rows = {"MFCC statistics baseline": {"eer": eer(scores, labels), "min_dcf_0.01": min_dcf(scores, labels, 0.01)}}
    for name, folder in (("SSL model, trained", "eval-trained"), ("same encoder, untrained", "eval-untrained")):
        metrics = json.loads((out / folder / "metrics.json").read_text())
        rows[name] = metrics["lists"][Path(trials).stem]["scoring"]["cosine"]
    print(f"\n{'system':<28} {'EER %':>7} {'minDCF(0.01)':>13}")
    for name, m in rows.items():
        print(f"{name:<28} {100 * m['eer']:>7.2f} {m['min_dcf_0.01']:>13.3f}")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))

if __name__ == "__main__":
    sys.exit(main())
