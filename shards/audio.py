"""Reading source audio for sharding: decode, downmix, resample to 16 kHz, validate, cut long files.

Anything that is not usable speech-or-noise audio becomes a `Rejected` with a reason a person can
act on; the writer lists it in rejected.jsonl instead of crashing the run.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from voxstream.shards.format import SAMPLE_RATE

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
SILENCE_DBFS = -60.0  # a peak this low is a dead channel or digital silence, not a recording


class Rejected(Exception):
    """An input that is skipped, with the reason that goes to rejected.jsonl."""


def read_audio(path: str, channel: str = "mix") -> tuple[np.ndarray, int]:
    """float32 mono samples in [-1, 1] and the file's sample rate.

    channel="mix" averages the channels (speech, noise); "first" keeps channel 0, for multi-microphone
    RIRs, where averaging impulse responses of different positions would smear them.
    """
    if os.path.getsize(path) == 0:
        raise Rejected("empty file (0 bytes)")
    try:
        if path.endswith(".m4a"):
            wave, rate = _read_with_ffmpeg(path)
        else:
            wave, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise Rejected(f"unreadable or not audio: {e}") from None
    if wave.shape[0] == 0:
        raise Rejected("no samples")
    wave = wave.mean(axis=1, dtype=np.float32) if channel == "mix" else wave[:, 0]
    if not np.isfinite(wave).all():
        raise Rejected("non-finite samples (NaN or inf)")
    return np.ascontiguousarray(wave), rate


def _read_with_ffmpeg(path: str) -> tuple[np.ndarray, int]:
    proc = subprocess.run([ffmpeg_binary(), "-v", "error", "-nostdin", "-i", path, "-f", "wav", "-"],
                          capture_output=True)
    if proc.returncode != 0:
        raise Rejected(f"ffmpeg could not decode it: {proc.stderr.decode(errors='replace').strip()[:200]}")
    return sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)


def ffmpeg_binary() -> str:
    found = shutil.which("ffmpeg")
    if found is None:
        raise FileNotFoundError("ffmpeg not on PATH")
    return found


def to_16k(wave: np.ndarray, rate: int) -> np.ndarray:
    """int16 samples at 16 kHz, resampled with torchaudio's windowed sinc, rounded and clipped."""
    if rate != SAMPLE_RATE:
        wave = AF.resample(torch.from_numpy(wave), rate, SAMPLE_RATE).numpy()
    # scaling by a power of two is exact in float32, so float64 would give the very same integers
    return np.clip(np.round(wave * np.float32(32768.0)), -32768, 32767).astype(np.int16)


def check(wave: np.ndarray, min_duration: float) -> None:
    """Raise Rejected if int16 16 kHz samples are too short or silent to be worth a sample."""
    if len(wave) == 0:
        raise Rejected("no samples after resampling")
    duration = len(wave) / SAMPLE_RATE
    if duration < min_duration:
        raise Rejected(f"too short: {duration:.3f} s < --min-duration {min_duration} s")
    peak = int(np.abs(wave.astype(np.int32)).max())
    peak_db = 20 * np.log10(peak / 32768) if peak else -np.inf
    if peak_db < SILENCE_DBFS:
        raise Rejected(f"silent: peak {peak_db:.1f} dBFS < {SILENCE_DBFS} dBFS")


def cut_points(wave: np.ndarray, max_samples: int, frame: int = 160) -> list[tuple[int, int]]:
    """(start, end) segments no longer than max_samples, cut at the quietest 10 ms frame.

    Each cut is searched in the second half of the allowed span, so segments stay at least half the
    maximum long (except the last) and cuts fall in pauses rather than mid-word; among equally quiet
    frames the latest wins, which keeps segments long.
    """
    segments, start = [], 0
    while len(wave) - start > max_samples:
        lo, hi = start + max_samples // 2, start + max_samples
        n = (hi - lo) // frame
        frames = wave[lo:lo + n * frame].astype(np.float32).reshape(n, frame)
        energy = (frames ** 2).sum(axis=1)[::-1]  # reversed: ties go to the latest quiet frame
        cut = lo + (n - 1 - int(np.argmin(energy))) * frame if n else hi
        segments.append((start, cut))
        start = cut
    segments.append((start, len(wave)))
    return segments
