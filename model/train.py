"""The training loop, nanoGPT-style: one function from recipe to checkpoints, DDP when under torchrun.

Per step: the next batch of views (int16, pinned) goes to the device, each view gets its own
augmentation draw there, the method returns (loss, stats), then backward, clip, optimizer step and
the method's own after-step update (EMA teachers, queues). Everything a step depends on is in the
checkpoint (weights, optimizer, method buffers, step, RNG states; the stream position and the LR/WD
schedules follow from the step), so a run that was killed and resumed follows the trajectory of one
that was not. A resume on another number of ranks keeps the global batch where it divides
(preflight.rescale_batch), carries the method state (replicated on every rank), the RNG states of the
ranks both worlds have, and streams the epoch's remaining steps from fresh draws. What the loop
carries between steps is one LoopState; SIGTERM is a StopRequest that the run installs and removes.
What a run checks before its first step is in model/preflight.py.

With `ssps.enabled` (model/ssps.py) the loader adds a clean reference crop as the last view: SSPS
embeds it and draws the step's positives before the step, and queues both after it; its state is
saved with the checkpoint. A checkpoint of a run without SSPS resumes with empty queues, so SSPS can
continue a finished run (sslsv trains SimCLR 100 epochs, then SSPS 10 more from that checkpoint).
"""
from __future__ import annotations

import contextlib
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from voxstream.model import distributed
from voxstream.model.checkpoint import first_nonfinite, load_weights, save_checkpoint
from voxstream.model.encoders import compile_encoders
from voxstream.model.logs import Meter, MetricsLog
from voxstream.model.methods import build_method
from voxstream.model.preflight import (TrainingError, build_ssps, check_classes, check_outputs, find_resume,
                                       initial_encoder, rescale_batch, storage_errors)
from voxstream.model.recipe import OptimConfig, Recipe, RecipeError, TrainConfig, recipe_to_dict
from voxstream.model.report import write_report
from voxstream.model.schedules import cosine, warmup_cosine
from voxstream.model.ssps import SSPS, Positives
from voxstream.pipeline.augment import Augmenter
from voxstream.pipeline.cpu_augment import default_cache_dir, prepare_cpu_augment
from voxstream.pipeline.loader import Batch, group_ids, make_loader, views_to_device
from voxstream.shards import storage
from voxstream.shards.format import MANIFEST
from voxstream.shards.labels import stable_hash


class StopRequest:
    """SIGTERM during one run: `install()` makes a new request the handler, `restore()` puts the old one back.

    The handler only records the signal: the step in flight finishes and every rank stops at the same
    step boundary.
    """

    def __init__(self) -> None:
        self.signal = 0
        self.previous = None

    @classmethod
    def install(cls) -> StopRequest:
        stop = cls()
        stop.previous = signal.signal(signal.SIGTERM, stop._record)
        return stop

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _record(self, signum, frame) -> None:
        self.signal = signum

    def requested(self, control) -> bool:
        """True on every rank as soon as any rank got SIGTERM (so all stop at the same step)."""
        flag = torch.tensor([self.signal], dtype=torch.int32)
        if distributed.is_dist():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
        return bool(flag.item())


@dataclass
class LoopState:
    """What the loop carries from step to step besides weights, optimizer and RNG states."""
    step: int                      # optimizer steps done
    lr: float = 0.0                # the schedules of the latest step, logged with its interval
    weight_decay: float = 0.0
    draw: int = 0                  # make_loader's draw for this epoch: 0, or the step of a resume on another world size
    last_good: str | None = None   # newest checkpoint written or resumed from, named when training diverges

    def diverged(self, what: str) -> TrainingError:
        return TrainingError(f"{what} is not finite; stopped without a checkpoint; "
                             f"last good checkpoint: {self.last_good or 'none'}")


def build_optimizer(method: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on weight matrices only, not on biases and norm scales (DINO, MoCo v3)."""
    params = [p for p in method.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "decay": True},
              {"params": [p for p in params if p.ndim < 2], "decay": False}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def rng_state(augmenter: Augmenter) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "augment": augmenter.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, augmenter: Augmenter) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    augmenter.load_state_dict(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def draw_positives(ssps: SSPS, step: int, encoder: nn.Module, batch: Batch, reference: torch.Tensor,
                   groups: torch.Tensor, autocast: torch.autocast) -> Positives:
    """This step's SSPS draw from the batch's clean reference crops (the loader's last view)."""
    if min(batch.indices) < 0:
        raise TrainingError("data.train: shards without sample positions in their metadata (written by an "
                            "older make_shards.py): rewrite them with tools/make_shards.py to train with ssps")
    device = reference.device
    indices = torch.tensor(batch.indices, dtype=torch.int64).to(device, non_blocking=True)
    speakers = torch.tensor([stable_hash(s) if s else 0 for s in batch.speakers], dtype=torch.int64)
    with autocast:
        return ssps.begin(step, encoder, reference, indices, groups, speakers.to(device, non_blocking=True))


def validate(method: nn.Module, cfg: TrainConfig, step: int, device: torch.device) -> dict:
    """EER and minDCF of the current embedder on train.trials (rank 0; the others wait).

    Its outputs go to out_dir/val/step-N when out_dir is local, else to a temporary folder removed after.
    """
    from voxstream.model.evaluate import EvalConfig, evaluate

    shards = storage.exists(storage.join(cfg.trials_audio, MANIFEST), cfg.storage_options)
    folder = (contextlib.nullcontext(Path(storage.filesystem(cfg.out_dir)[1]) / "val") if storage.is_local(cfg.out_dir)
              else tempfile.TemporaryDirectory(prefix="voxstream-val-"))
    embedder = method.embedder()
    modes = [(m, m.training) for m in embedder.modules()]
    embedder.eval()
    try:
        with folder as out:
            report = evaluate(embedder, EvalConfig(
                trials=[cfg.trials], audio_root="" if shards else cfg.trials_audio,
                shards=cfg.trials_audio if shards else "", out=str(Path(out) / f"step-{step:08d}"),
                device=str(device), storage_options=cfg.storage_options))
    finally:
        for module, mode in modes:
            module.train(mode)
    scoring = next(iter(report["lists"].values()))["scoring"]
    metrics = scoring[list(scoring)[-1]]  # the list's final scoring (AS-norm when configured)
    return {"val_eer": metrics["eer"], "val_min_dcf_0.01": metrics["min_dcf_0.01"]}


def write_run_report(cfg: TrainConfig) -> None:
    """report.md and report.png in out_dir; a report that cannot be drawn never fails a finished run."""
    try:
        verdict, url = write_report(cfg.out_dir, storage_options=cfg.storage_options)
        tqdm.write(f"report: {url} ({verdict})", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  the checkpoint is written: drawing curves must not turn it into a failure
        tqdm.write(f"report not written: {e!r}", file=sys.stderr)


def train(recipe: Recipe, resume: bool | str = False) -> int:
    """Train until recipe.train.epochs are done or SIGTERM; returns the step reached."""
    device, control = distributed.setup_distributed()
    try:
        return _train(recipe, resume, device, control)
    finally:
        if distributed.is_dist():
            dist.destroy_process_group()


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = lr, wd if group["decay"] else 0.0


def autocast_for(device: torch.device, cfg: TrainConfig) -> torch.autocast:
    """The step's precision: bf16 autocast on CUDA when train.bf16, on CPU only with train.bf16_cpu too;
    otherwise a disabled autocast (fp32). The fbank front-end and the augmentation run in fp32 either way."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=cfg.bf16 and (device.type == "cuda" or cfg.bf16_cpu))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, augmenter: Augmenter, views: list[torch.Tensor],
               groups: torch.Tensor, autocast: torch.autocast, grad_clip: float,
               positives: Positives | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step on a batch of views (and their group ids) already on the device; (loss, stats) stay there.
    `positives`: this step's SSPS draw (model/ssps.py), for the methods that take it."""
    with torch.no_grad():
        if augmenter.enabled:
            views = [augmenter(v) for v in views]  # each view its own draw: different noise, room, SNR
    with autocast:
        loss, stats = model(views, groups) if positives is None else model(views, groups, positives)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        stats = {**stats, "grad_norm": nn.utils.clip_grad_norm_(params, grad_clip)}
    optimizer.step()
    return loss, stats


def write_checkpoint(recipe: Recipe, method: nn.Module, optimizer: torch.optim.Optimizer, augmenter: Augmenter,
                     ssps: SSPS | None, state: LoopState, final: bool, log: MetricsLog | None, control) -> None:
    """Every rank sends its step and RNG states; rank 0 writes (with the SSPS state, the same on every
    rank); nobody goes on until the file exists, which becomes `state.last_good`.

    Weights or buffers with NaN/inf on any rank (a BatchNorm running_var can overflow while the loss
    stays finite) write nothing: every rank raises the same TrainingError.
    """
    cfg, world, step = recipe.train, distributed.world_size(), state.step
    bad = first_nonfinite(method.state_dict())
    flag = torch.tensor([bad is not None], dtype=torch.int32)
    if distributed.is_dist():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
    if flag.item():
        raise state.diverged(f"step {step}: {bad or 'a weight on another rank'}")
    mine = {"step": step, "rng": rng_state(augmenter)}
    ranks = [mine] * world
    if distributed.is_dist():
        dist.all_gather_object(ranks, mine, group=control)
    saved = None
    if distributed.rank() == 0:  # an out_dir in a bucket rides out an outage like the data does (atomic writes)
        ckpt = {"recipe": recipe_to_dict(recipe), "method": method.state_dict(), "step": step,
                "optimizer": optimizer.state_dict(), "ranks": ranks, "world_size": world, "draw": state.draw,
                **({"ssps": ssps.state_dict()} if ssps else {})}
        saved = storage.Retry().call(lambda: save_checkpoint(ckpt, cfg.out_dir, final, cfg.keep_last,
                                                             cfg.storage_options), f"write a checkpoint to {cfg.out_dir}")
        storage.Retry().call(log.sync, f"write {cfg.out_dir}/metrics.jsonl")
    if distributed.is_dist():
        dist.barrier(group=control)
    state.last_good = saved or "rank 0's checkpoint"


def log_interval(meter: Meter, state: LoopState, recipe: Recipe, log: MetricsLog | None, bar: tqdm) -> None:
    """Averages since the last line; stops on a NaN/inf loss before anything is saved."""
    first_step = state.step - len(meter.losses)
    record, bad = meter.summarize(recipe.data.batch_size * distributed.world_size())
    if bad is not None:
        raise state.diverged(f"step {first_step + bad + 1}: loss")
    if log:
        log.write({"step": state.step, "epoch": (state.step - 1) // recipe.data.steps_per_epoch, "lr": state.lr,
                   "weight_decay": state.weight_decay, **record})
        bar.set_postfix(loss=f"{record['loss']:.4f}", utt_s=f"{record['utt_per_s']:.0f}",
                        wait=f"{record['data_wait']:.0%}", refresh=False)


def _train(recipe: Recipe, resume: bool | str, device: torch.device, control) -> int:
    cfg, data, optim, rank, world = recipe.train, recipe.data, recipe.optim, distributed.rank(), distributed.world_size()
    with storage_errors("train.out_dir"):
        check_outputs(recipe)
    with storage_errors("data.labels"):
        check_classes(recipe)
    with storage_errors("--resume" if isinstance(resume, str) else "train.out_dir"):
        url, ckpt = find_resume(recipe, resume)
    elastic = ckpt is not None and ckpt["world_size"] != world
    if elastic:
        recipe = rescale_batch(recipe, ckpt, world)
        data = recipe.data
    steps_per_epoch, utterances_per_step = data.steps_per_epoch, data.batch_size * world
    total, warmup = cfg.epochs * steps_per_epoch, round(optim.warmup_epochs * steps_per_epoch)
    start_step = ckpt["step"] if ckpt else 0
    epoch, skip = divmod(start_step, steps_per_epoch)
    # The stream of a resume mid-epoch: the checkpoint's own, or fresh draws on another world size.
    draw = 0 if not skip else start_step if elastic else ckpt.get("draw", 0)
    with storage_errors("augment.cpu"):  # its shard sets become local folders once, before any worker starts
        try:
            cpu_augment = prepare_cpu_augment(recipe.augment.cpu, default_cache_dir(cfg.out_dir),
                                              recipe.augment.storage_options)
        except ValueError as e:  # an entry audiomentations rejects: the message names it
            raise RecipeError(str(e)) from None
    with storage_errors("data.train"):  # unreadable data fails here, before the model is built
        loader = make_loader(data, epoch, rank, world, start_step=skip, cpu_augment=cpu_augment,
                             reference_seconds=recipe.ssps.ref_seconds if recipe.ssps.enabled else 0.0, draw=draw)
        ssps = build_ssps(recipe, loader, total, device)

    seed_everything(cfg.seed)  # the same initial weights on every rank
    with storage_errors("train.init"):
        encoder = initial_encoder(recipe) if cfg.init and not ckpt else None
    method = build_method(recipe.model, recipe.method, encoder).to(device)
    if cfg.sync_bn and distributed.is_dist() and device.type == "cuda":  # SyncBatchNorm has no CPU kernel
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    optimizer = build_optimizer(method, optim)
    seed_everything(cfg.seed * 1000 + rank)  # per-rank draws from here on
    with storage_errors("augment (noise/rir banks)"):
        augmenter = Augmenter.from_config(recipe.augment, device, seed=cfg.seed * 1000 + rank)
    if ckpt:
        load_weights(method, ckpt["method"], url)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ssps and "ssps" in ckpt:
            ssps.load_state_dict(ckpt["ssps"])
        elif ssps and rank == 0:  # sslsv's recipe: SSPS for the last epochs of a finished SimCLR run
            print(f"{url}: no SSPS state (trained without ssps); SSPS starts with empty queues, filled from step "
                  f"{max(start_step, ssps.fill_step)}, and samples from the first epoch boundary after that, at or "
                  f"after step {ssps.start_step}", file=sys.stderr)
        if rank < ckpt["world_size"]:  # a rank the checkpoint lacks keeps its own seed, used by no rank before
            set_rng_state(ckpt["ranks"][rank]["rng"], augmenter)
        del ckpt
    if cfg.compile:
        compile_encoders(method)
    model = nn.parallel.DistributedDataParallel(
        method, device_ids=[device.index] if device.type == "cuda" else None) if distributed.is_dist() else method
    autocast = autocast_for(device, cfg)

    log = (MetricsLog(cfg.out_dir, cfg.storage_options, start_step if url else None, cfg.tensorboard)
           if rank == 0 else None)
    if rank == 0:
        where = f"resuming from {url} at step {start_step}" if url else "starting"
        print(f"{where}: {total} steps ({cfg.epochs} epochs x {steps_per_epoch}) on {world} rank(s), "
              f"{device.type}, out_dir {cfg.out_dir}", file=sys.stderr)
    bar = tqdm(total=total, initial=start_step, disable=rank != 0, unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    state, meter, run_started = LoopState(start_step, draw=draw, last_good=url), Meter(device), time.perf_counter()
    stop = StopRequest.install()  # this run's SIGTERM handler, until `finally` restores the previous one
    try:
        while state.step < total:
            read_retries: list[int] = []  # one entry a retry of this epoch's manifest reads, logged with the stream's
            if loader is None:  # the first epoch's was made before the model, to fail fast; later ones
                epoch, state.draw = state.step // steps_per_epoch, 0  # re-read the manifests, to ride out an outage
                loader = data.retry.call(lambda: make_loader(
                    data, epoch, rank, world, start_step=0, cpu_augment=cpu_augment,
                    reference_seconds=ssps.cfg.ref_seconds if ssps else 0.0), f"read data.train for epoch {epoch}",
                    on_retry=lambda: read_retries.append(1))
            fetched = time.perf_counter()
            for batch in loader:
                meter.waited += time.perf_counter() - fetched
                state.lr = warmup_cosine(state.step, total, warmup, optim.lr, optim.final_lr)
                state.weight_decay = cosine(state.step, total, optim.weight_decay, optim.final_weight_decay)
                set_schedules(optimizer, state.lr, state.weight_decay)
                views, groups = views_to_device(batch, device), group_ids(batch, device)
                positives = (draw_positives(ssps, state.step, method.encoder, batch, views.pop(), groups, autocast)
                             if ssps else None)
                loss, stats = train_step(model, optimizer, augmenter, views, groups, autocast, optim.grad_clip,
                                         positives)
                if ssps:  # the monitors read the drawn queue entries before this step's outputs overwrite them
                    stats = {**stats, **ssps.stats(positives)}
                    ssps.remember(state.step, positives)
                method.after_step(state.step, total)
                state.step += 1
                meter.add(loss, stats)
                bar.update()

                stopping = stop.requested(control)
                periodic = state.step % cfg.ckpt_every == 0 and state.step < total
                if state.step % cfg.log_every == 0 or periodic or stopping or state.step == total:
                    log_interval(meter, state, recipe, log, bar)
                if cfg.trials and (state.step == total or cfg.val_every and state.step % cfg.val_every == 0):
                    if log:
                        log.write({"step": state.step, **validate(method, cfg, state.step, device)})
                    if distributed.is_dist():
                        dist.barrier(group=control)
                if periodic or stopping:
                    write_checkpoint(recipe, method, optimizer, augmenter, ssps, state, False, log, control)
                if stopping:
                    if rank == 0:
                        tqdm.write(f"signal {stop.signal or 'on another rank'}: saved {state.last_good} at step "
                                   f"{state.step}; exiting", file=sys.stderr)
                    return state.step
                fetched = time.perf_counter()
            if log:  # rank 0's pipeline counters: skipped shards, repeated groups in a batch
                pipeline = loader.stats
                pipeline["retries"] += len(read_retries)
                log.write({"step": state.step, "epoch": (state.step - 1) // steps_per_epoch, "pipeline": pipeline})
            loader = None
        if state.step > start_step:
            write_checkpoint(recipe, method, optimizer, augmenter, ssps, state, True, log, control)
            if rank == 0:
                steps, seconds = state.step - start_step, time.perf_counter() - run_started
                tqdm.write(f"done: {steps} steps in {seconds:.0f} s ({steps / seconds:.2f} steps/s, "
                           f"{steps * utterances_per_step / seconds:.1f} utterances/s, data wait "
                           f"{meter.total_waited / seconds:.1%} on rank 0); saved {state.last_good}", file=sys.stderr)
                write_run_report(cfg)
        return state.step
    finally:
        stop.restore()
        augmenter.close()
        bar.close()
        if log:
            log.close()
