"""Embeddings written as Kaldi ark/scp (kaldiio), in parts, so an interrupted run resumes where it stopped.

Kaldi ark/scp is what WeSpeaker, ESPnet and Kaldi's scoring back-ends (PLDA, LDA, AS-norm) read, keys
and all, and `kaldiio.load_scp` gives lazy random access by key. Layout of the output folder:

    parts/part-00000.ark, part-00000.scp, ...   one part per `part_size` utterances
    embeddings.scp                              every key, sorted: written last, so it means complete

A part's .scp is written after its .ark, through a temporary name: a part without its .scp is the
remnant of a killed run and is rewritten, so no key is ever listed twice or points at a torn record.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import kaldiio
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from voxstream.model.embeddings import EmbedOptions, extract

_PART = re.compile(r"part-(\d{5})\.scp$")


def check_key(key: str, where: str) -> str:
    if not key or any(c.isspace() for c in key):
        raise ValueError(f"{where}: key {key!r} is empty or has whitespace, which Kaldi scp cannot hold")
    return key


class ArkWriter:
    """The finished keys of an output folder, and the next parts to write into it."""

    def __init__(self, out: str | Path):
        self.out = Path(out).resolve()   # scp lines name their ark by absolute path, as Kaldi tools expect
        self.parts = self.out / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, str] = {}
        numbers = [-1]
        for scp in sorted(self.parts.glob("part-*.scp")):
            if _PART.search(scp.name):
                numbers.append(int(_PART.search(scp.name).group(1)))
                self.done.update(line.rstrip("\n").split(" ", 1) for line in open(scp) if line.strip())
        self.next = max(numbers) + 1

    def write(self, embeddings: dict[str, np.ndarray]) -> None:
        stem = self.parts / f"part-{self.next:05d}"
        tmp = stem.with_suffix(".scp.tmp")
        kaldiio.save_ark(str(stem.with_suffix(".ark")), embeddings, scp=str(tmp))
        os.replace(tmp, stem.with_suffix(".scp"))
        with open(stem.with_suffix(".scp")) as f:
            self.done.update(line.rstrip("\n").split(" ", 1) for line in f if line.strip())
        self.next += 1

    def finish(self) -> Path:
        """embeddings.scp over every part, atomically: its presence means every key is written."""
        final, tmp = self.out / "embeddings.scp", self.out / "embeddings.scp.tmp"
        tmp.write_text("".join(f"{k} {self.done[k]}\n" for k in sorted(self.done)))
        os.replace(tmp, final)
        return final


def embed_to_ark(network: nn.Module, audio: Iterable[tuple[str, np.ndarray]], writer: ArkWriter,
                 opts: EmbedOptions, device: torch.device | str, total: int | None = None,
                 part_size: int = 1000) -> int:
    """Embed what `audio` yields (keys not yet done, by the caller's choice) into parts; returns the count."""
    pending: dict[str, np.ndarray] = {}
    count = 0
    network.eval().to(device)
    with tqdm(total=total, desc="embeddings", unit="utt", dynamic_ncols=True) as bar:
        for keys, z in extract(network, audio, opts, device):
            pending.update(zip(keys, z.astype(np.float32)))
            count += len(keys)
            bar.update(len(keys))
            if len(pending) >= part_size:
                writer.write(pending)
                pending = {}
    if pending:
        writer.write(pending)
    return count


def read_scp(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, embedding) of an scp, in its order."""
    yield from kaldiio.load_scp_sequential(str(path))
