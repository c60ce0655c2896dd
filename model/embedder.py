"""Use a trained model: load a checkpoint's embedder, embed audio, score and verify pairs.

    from voxstream.model.embedder import Embedder
    model = Embedder.load("s3://bucket/run/last.pt", metrics="eval-out/metrics.json")
    a = model.embed("alice.wav")                  # a file: any sample rate, mono or stereo
    b = model.embed(wave, sample_rate=44100)      # a [samples] or [channels, samples] array
    batch = model.embed(["x.wav", "y.flac"])      # [2, D]
    model.score(a, b)                             # cosine
    model.verify("alice.wav", "bob.wav")          # (score, same speaker?) at the evaluation's EER threshold

An embedding is computed exactly as tools/evaluate.py computes it (`embeddings.extract`): the whole
utterance, mixed to mono and resampled to 16 kHz, floored to a multiple of 0.1 s, through the network
in eval mode (DINO's teacher, every other method's encoder), L2-normalised.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from voxstream.model.embeddings import EmbedOptions, extract, read_wave, to_mono_16k
from voxstream.shards import storage

Audio = Union[str, os.PathLike, np.ndarray, torch.Tensor]


def eer_threshold(metrics: str, trial_list: str = "", storage_options: dict | None = None) -> float:
    """The cosine EER threshold of one trial list (the first by default) in an evaluate.py metrics.json."""
    report = storage.read_json(metrics, storage_options)
    lists = report.get("lists") or {}
    name = trial_list or next(iter(lists), "")
    if name not in lists:
        raise ValueError(f"{metrics}: no trial list {name!r} (lists: {', '.join(lists) or 'none'})")
    if report.get("mean_from"):   # its scores subtract a set's mean embedding, which plain cosine does not
        raise ValueError(f"{metrics}: scored after subtracting the mean of {report['mean_from']}; "
                         "its threshold does not apply to plain cosine scores (evaluate without --mean-from)")
    row = lists[name]["scoring"]["cosine"]
    if "eer_threshold" not in row:
        raise ValueError(f"{metrics}: no eer_threshold (written by an older evaluate.py): evaluate again")
    return float(row["eer_threshold"])


class Embedder:
    """A speaker embedder in eval mode on one device, with an optional decision threshold."""

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu", threshold: float | None = None,
                 name: str = "", options: EmbedOptions | None = None):
        self.device = torch.device(device)
        self.network = network.eval().to(self.device)
        self.threshold, self.name = threshold, name
        self.options = options or EmbedOptions(workers=1)

    @classmethod
    def load(cls, checkpoint: str, device: str | torch.device | None = None, metrics: str = "",
             trial_list: str = "", storage_options: dict | None = None) -> "Embedder":
        """The embedder of a checkpoint (path or fsspec URL); `metrics` (an evaluate.py metrics.json)
        gives the threshold: the cosine EER point of `trial_list`, the first list by default."""
        from voxstream.model.checkpoint import load_method
        method, _ = load_method(checkpoint, storage_options)
        threshold = eer_threshold(metrics, trial_list, storage_options) if metrics else None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(method.embedder(), device, threshold, checkpoint)

    def embed(self, audio: Audio | Sequence[Audio], sample_rate: int | None = None) -> np.ndarray:
        """[D] for one file or waveform, [n, D] for a list; arrays need their `sample_rate`."""
        if isinstance(audio, (list, tuple)):
            waves = [self._wave(a, sample_rate, f"audio[{k}]") for k, a in enumerate(audio)]
        else:
            waves = [self._wave(audio, sample_rate, "audio")]
        rows: dict[int, np.ndarray] = {}   # extract batches by length, so rows come back out of order
        for ids, z in extract(self.network, enumerate(waves), self.options, self.device):
            rows.update(zip(ids, z))
        out = np.stack([rows[k] for k in range(len(waves))])
        return out if isinstance(audio, (list, tuple)) else out[0]

    @staticmethod
    def _wave(audio: Audio, sample_rate: int | None, name: str) -> np.ndarray:
        if isinstance(audio, (str, os.PathLike)):
            return read_wave(os.fspath(audio))
        if sample_rate is None:
            raise ValueError(f"{name}: a waveform needs its sample_rate")
        wave = audio.detach().cpu() if isinstance(audio, torch.Tensor) else np.asarray(audio)
        return to_mono_16k(wave, sample_rate, name)

    @staticmethod
    def score(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
        """Cosine similarity of two embeddings, or row by row of two [n, D] arrays."""
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        return float(cos) if cos.ndim == 0 else cos

    def verify(self, a: Audio, b: Audio, sample_rate: int | None = None,
               threshold: float | None = None) -> tuple[float, bool | None]:
        """(score, same speaker?) of two recordings; the decision is None when no threshold is known."""
        ea, eb = self.embed([a, b], sample_rate)
        score = self.score(ea, eb)
        threshold = self.threshold if threshold is None else threshold
        return score, None if threshold is None else bool(score >= threshold)
