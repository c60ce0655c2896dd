"""Training step time and utterances/s per method and encoder (`python tools/bench.py train`).

Each figure times the trainer's step (model.train.train_step: forward, backward, optimizer step; then
after_step) on random waveforms, in the trainer's precision (bf16 on CUDA, fp32 on CPU; --bf16 or
--no-bf16 to choose). Its baseline is the bare encoder doing the same step on the same views (the
method's overhead is the ratio); the torch.compile figure's baseline (on CUDA, or with --compile) is
the eager figure of the same method.
"""
from __future__ import annotations

import argparse
import time

import torch

from voxstream.model import train
from voxstream.model.encoders import compile_encoders
from voxstream.model.methods import METHODS, build_method
from voxstream.model.recipe import TrainConfig, recipe_from_dict
from voxstream.pipeline.augment import AugmentConfig, Augmenter

ENCODERS = {"ecapa512": {"name": "ecapa", "channels": 512, "embed_dim": 192},
            "ecapa1024": {"name": "ecapa", "channels": 1024, "embed_dim": 192},
            "resnet34": {"name": "resnet34", "channels": 128, "embed_dim": 256},
            "ecapa128": {"name": "ecapa", "channels": 128, "embed_dim": 128}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--methods", default="simclr" if cuda else "simclr,moco,dino",
                        help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--encoders", default="ecapa512" if cuda else "ecapa512,resnet34",
                        help=f"comma-separated, from {','.join(ENCODERS)}")
    parser.add_argument("--batch", type=int, default=256 if cuda else 8, help="utterances per step")
    parser.add_argument("--seconds", type=float, default=2.0, help="view duration (DINO: global views)")
    parser.add_argument("--dino-local", type=int, default=4, help="DINO local views, half as long")
    parser.add_argument("--steps", type=int, default=20 if cuda else 3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on CUDA only, as the trainer)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the step with torch.compile'd encoders (default: on CUDA only)")


def views_for(method: str, args, device: torch.device) -> list[torch.Tensor]:
    n = int(args.seconds * 16000)
    lengths = [n, n] + ([n // 2] * args.dino_local if method == "dino" else [])
    return [torch.rand(args.batch, t, device=device) * 2 - 1 for t in lengths]


def time_steps(step, args, device: torch.device) -> float:
    """Median seconds per call of step() after warm-up (the median shrugs off a busy machine)."""
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def precision(args, device: torch.device) -> TrainConfig:
    """The trainer's precision settings: bf16 on CUDA and fp32 on CPU, unless --bf16/--no-bf16 says."""
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    return TrainConfig(bf16=bf16, bf16_cpu=bf16)


def train_step(module, views, device: torch.device, cfg: TrainConfig, after_step=None):
    """The trainer's step in the precision of `cfg`, without augmentation or clipping."""
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    no_augment, autocast = Augmenter(AugmentConfig(), None, None), train.autocast_for(device, cfg)

    def step():
        train.train_step(module, opt, no_augment, views, None, autocast, 0.0)
        if after_step:
            after_step(1, 100)
    return step


class BareEncoder(torch.nn.Module):
    """The baseline: the encoder alone on the same views, a trivial loss."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, views: list[torch.Tensor], groups=None) -> tuple[torch.Tensor, dict]:
        return sum(self.encoder(v).float().square().mean() for v in views), {}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    cfg, rows = precision(args, device), []
    for enc_name in args.encoders.split(","):
        for name in args.methods.split(","):
            recipe = recipe_from_dict({"model": ENCODERS[enc_name], "method": {"name": name}})  # the defaults
            torch.manual_seed(0)
            method = build_method(recipe.model, recipe.method).to(device).train()
            views = views_for(name, args, device)
            base = time_steps(train_step(BareEncoder(method.encoder), views, device, cfg), args, device)
            eager = time_steps(train_step(method, views, device, cfg, method.after_step), args, device)
            utts = args.batch  # utterances per step (each brings len(views) crops)
            common = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "method": name, "encoder": enc_name, "batch": args.batch,
                      "views": [round(v.shape[1] / 16000, 2) for v in views],
                      "dtype": "bf16-autocast" if cfg.bf16 else "fp32"}
            rows.append({"figure": "train_step_ms", **common, "compile": False, "value": round(eager * 1e3, 2),
                         "utt_per_s": round(utts / eager, 1), "baseline": "encoder fwd+bwd only",
                         "baseline_ms": round(base * 1e3, 2), "ratio": round(eager / base, 3)})
            if device.type == "cuda" if args.compile is None else args.compile:
                compile_encoders(method)
                compiled = time_steps(train_step(method, views, device, cfg, method.after_step), args, device)
                rows.append({"figure": "train_step_ms", **common, "compile": True, "value": round(compiled * 1e3, 2),
                             "utt_per_s": round(utts / compiled, 1), "baseline": "eager",
                             "baseline_ms": round(eager * 1e3, 2), "ratio": round(compiled / eager, 3)})
            del method
    return rows
