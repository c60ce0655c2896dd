"""`bench.py gpu`: the figures to take on the first GPU at hand, in one JSON file (`--out`), each with
its target or anchor (measured on an H200 with plain eager code: 62 ms a step, 4,100 utterances/s)
and the peak GPU memory it took. About 5 minutes on one GPU with the defaults.

- noise + reverb of 512 crops of 2 s (bench_augment's generated banks);
- the ECAPA-512 SimCLR step, batch 256, 2 x 2 s, bf16, eager and with compiled encoders;
- the ECAPA-512 DINO step, batch 128, 2 x 4 s + 4 x 2 s;
- a 300-step SimCLR run of the trainer on local shards of generated speech (bench_pipeline's) with
  --workers loader workers: data-wait as a fraction of the run after its first log interval (worker
  start-up), and the workers a GPU needs at the step rate it reached (worker CPU per batch).

`--device cpu` with small sizes is a dry run (the test suite's); there the memory is the process's
peak resident set, which only grows. The training run takes the trainer's device (the GPU when there
is one).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import torch

from bench_augment import crops_per_s, generate_sets, noise_and_reverb
from bench_pipeline import generate
from bench_train import ENCODERS, precision, time_steps, train_step, views_for
from voxstream.model import train
from voxstream.model.encoders import compile_encoders
from voxstream.model.methods import build_method
from voxstream.model.recipe import recipe_from_dict
from voxstream.pipeline.augment import Augmenter
from voxstream.shards.format import SAMPLE_RATE

TINY = {"model": {"name": "ecapa", "channels": 16, "embed_dim": 16, "n_mels": 24},  # --tiny: a dry run
        "simclr": {"projector_hidden_dim": 32, "projector_output_dim": 16},
        "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}}
ANCHORS = {"augment_ms": {"target": "< 3 ms"},
           "simclr_step_ms": {"target": "< 45 ms on an H200", "anchor": "62 ms (H200, eager)"},
           "simclr_step_compiled_ms": {"target": "< 45 ms on an H200", "anchor": "62 ms (H200, eager)"},
           "dino_step_ms": {"target": "< 130 ms", "anchor": "130 ms (H200)"},
           "run_data_wait": {"target": "< 2 % of step time"}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--out", default="bench-gpu.json")
    parser.add_argument("--encoder", default="ecapa512", choices=sorted(ENCODERS))
    parser.add_argument("--tiny", action="store_true", help="a tiny encoder and heads instead (a CPU dry run)")
    parser.add_argument("--crops", type=int, default=512, help="crops in one augmentation call")
    parser.add_argument("--seconds", type=float, default=2.0, help="a crop; DINO's global views are twice it")
    parser.add_argument("--simclr-batch", type=int, default=256)
    parser.add_argument("--dino-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per figure")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled figure")
    parser.add_argument("--run-steps", type=int, default=300, help="steps of the training run")
    parser.add_argument("--workers", type=int, default=8, help="loader workers of the training run")
    parser.add_argument("--utterances", type=int, default=400, help="generated utterances (2-10 s) for the run")


class Peak:
    """Peak memory (MB) from entering to now: GPU memory allocated, or the process's resident set on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def mb(self) -> float:
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    def __exit__(self, *exc):
        return False


def augment_figure(args, device: torch.device, folder: Path) -> dict:
    aug = Augmenter.from_config(noise_and_reverb(*generate_sets(folder, 0)), device, 0)
    crops = [0.1 * torch.randn(args.crops, round(args.seconds * SAMPLE_RATE), device=device)]
    with Peak(device) as peak:
        rate = crops_per_s(aug, crops, 20, cuda=device.type == "cuda")
        aug.close()
        return {"value": round(1000 * args.crops / rate, 3), "unit": "ms", "crops": args.crops,
                "seconds": args.seconds, "peak_memory_mb": peak.mb()}


def model_and_method(name: str, args) -> dict:
    if args.tiny:
        return {"model": TINY["model"], "method": {"name": name, **TINY[name]}}
    return {"model": ENCODERS[args.encoder], "method": {"name": name}}  # the method's defaults


def step_figures(name: str, batch: int, seconds: float, args, device: torch.device) -> dict[str, dict]:
    """The method's step (ms) in the trainer's precision, eager and (for SimCLR) with compiled encoders."""
    recipe = recipe_from_dict(model_and_method(name, args))
    torch.manual_seed(0)
    method = build_method(recipe.model, recipe.method).to(device).train()
    shape = argparse.Namespace(seconds=seconds, batch=batch, dino_local=4)
    views, cfg = views_for(name, shape, device), precision(argparse.Namespace(bf16=None), device)
    common = {"unit": "ms/step", "batch": batch, "views_s": [round(v.shape[1] / SAMPLE_RATE, 2) for v in views],
              "encoder": "tiny" if args.tiny else args.encoder, "dtype": "bf16-autocast" if cfg.bf16 else "fp32"}
    figures = {}
    for compiled in (False, True) if name == "simclr" and args.compile else (False,):
        if compiled:
            compile_encoders(method)
        with Peak(device) as peak:
            seconds_per_step = time_steps(train_step(method, views, device, cfg, method.after_step), args, device)
            figures[f"{name}_step{'_compiled' if compiled else ''}_ms"] = {
                "value": round(1000 * seconds_per_step, 2), **common, "utt_per_s": round(batch / seconds_per_step, 1),
                "peak_memory_mb": peak.mb()}
    return figures


def run_figure(args, device: torch.device, folder: Path) -> dict:
    """The trainer on local shards: data-wait after the first log interval, and the workers needed."""
    interval = max(1, args.run_steps // 10)
    recipe = recipe_from_dict({
        "data": {"train": generate(folder, args.utterances, (2.0, 10.0), 0), "views": [args.seconds] * 2,
                 "batch_size": args.simclr_batch, "workers": args.workers, "steps_per_epoch": args.run_steps},
        "augment": dict(zip(("noise", "rir"), generate_sets(folder, 1))),
        **model_and_method("simclr", args),
        "train": {"out_dir": str(folder / "run"), "log_every": interval, "ckpt_every": args.run_steps}})
    with Peak(device) as peak:
        train.train(recipe)
        memory = peak.mb()
    lines = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [line for line in lines if "loss" in line][1:] or [line for line in lines if "loss" in line]
    wait = sum(line["data_wait"] for line in steady) / len(steady)
    utt_per_s = sum(line["utt_per_s"] for line in steady) / len(steady)
    stream = next(line["pipeline"] for line in lines if "pipeline" in line)
    per_worker = stream["batches"] * args.simclr_batch / stream["cpu_seconds"]  # utterances per worker CPU second
    return {"value": round(wait, 4), "unit": "fraction of step time", "steps": args.run_steps,
            "workers": args.workers, "utt_per_s": round(utt_per_s, 1),
            "utt_per_worker_cpu_s": round(per_worker, 1), "workers_needed": math.ceil(utt_per_s / per_worker),
            "peak_memory_mb": memory}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    started, figures = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        folder = Path(tmp)
        figures["augment_ms"] = augment_figure(args, device, folder / "banks")
        figures.update(step_figures("simclr", args.simclr_batch, args.seconds, args, device))
        figures.update(step_figures("dino", args.dino_batch, 2 * args.seconds, args, device))
        figures["run_data_wait"] = run_figure(args, device, folder / "run")
    for name, figure in figures.items():
        figure.update(ANCHORS[name])
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1), "figures": figures}
    Path(args.out).write_text(json.dumps(report, indent=1))
    return [{"figure": name, **figure} for name, figure in figures.items()]
