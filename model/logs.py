"""Training metrics: per-interval averages over ranks, JSONL on rank 0, optional TensorBoard.

Losses stay on the device between log lines (no per-step host sync); the interval's losses are
checked for NaN/inf when they are averaged, which happens before every checkpoint too.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from voxstream.model import distributed
from voxstream.shards import storage

METRICS = "metrics.jsonl"


class Meter:
    """Accumulates one logging interval: per-step losses, method stats, time spent waiting for data."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total_waited = 0.0  # this rank's, over the whole run
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.stats: dict[str, torch.Tensor] = {}
        self.waited = 0.0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        self.losses.append(loss.detach().float())
        for name, value in stats.items():
            value = value.detach().float()
            self.stats[name] = self.stats[name] + value if name in self.stats else value

    def summarize(self, utterances_per_step: int) -> tuple[dict, int | None]:
        """(averages over steps and ranks, index of the first non-finite loss or None); resets.

        Every rank must call this at the same steps: it is one all-reduce.
        """
        n, names = len(self.losses), sorted(self.stats)
        packed = torch.cat([torch.stack(self.losses), torch.stack([self.stats[k] for k in names]) / n
                            if names else torch.zeros(0, device=self.device),
                            torch.tensor([self.waited], device=self.device)])
        if distributed.is_dist():
            dist.all_reduce(packed)
            packed /= distributed.world_size()
        values = packed.cpu().tolist()
        elapsed = time.perf_counter() - self.started
        losses = values[:n]
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        record = {"loss": sum(losses) / n, **dict(zip(names, values[n:n + len(names)])),
                  "steps_per_s": n / elapsed, "utt_per_s": n * utterances_per_step / elapsed,
                  "data_wait": values[-1] / elapsed}
        self.total_waited += self.waited
        self.reset()
        return record, bad


class MetricsLog:
    """metrics.jsonl in out_dir (rank 0 only), plus TensorBoard scalars when asked.

    Local files are appended line by line; object stores cannot append, so there the whole file is
    rewritten atomically on `sync()` (called at checkpoints and at the end). A resumed run drops
    the lines a killed run wrote after its last checkpoint, so the file reads as one trajectory.
    """

    def __init__(self, out_dir: str, storage_options: dict, resume_step: int | None, tensorboard: bool):
        self.url, self.options = storage.join(out_dir, METRICS), storage_options
        self.local = storage.is_local(out_dir)
        self.lines: list[str] = []
        if resume_step is not None and storage.exists(self.url, storage_options):
            old = storage.read_bytes(self.url, storage_options).decode().splitlines()
            self.lines = [ln for ln in old if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        storage.write_bytes(self.url, "".join(ln + "\n" for ln in self.lines).encode(), storage_options)
        self.file = open(storage.filesystem(self.url)[1], "a") if self.local else None
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            self.tb = SummaryWriter(str(Path(storage.filesystem(out_dir)[1]) / "tb"))

    def write(self, record: dict) -> None:
        line = json.dumps(record)
        self.lines.append(line)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        if self.tb:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(name, value, record["step"])

    def sync(self) -> None:
        if not self.local:
            storage.write_bytes(self.url, "".join(ln + "\n" for ln in self.lines).encode(), self.options)
        if self.tb:
            self.tb.flush()

    def close(self) -> None:
        self.sync()
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
