"""The simple baseline every trained model is compared with: per-utterance MFCC statistics.

An utterance becomes the mean and standard deviation of its MFCCs (c1..c19; c0 is only loudness);
the vectors of a trial list are standardised over that list (an unsupervised global mean/variance
normalisation, otherwise the largest coefficients decide every cosine), and a trial scores the
cosine of its two vectors. It knows nothing about speakers, so it is hurt by channels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from voxstream.model.evaluate import read_trials
from voxstream.model.metrics import eer

SAMPLE_RATE = 16000
_MFCC = torchaudio.transforms.MFCC(
    sample_rate=SAMPLE_RATE, n_mfcc=20,
    melkwargs={"n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 40})


def mfcc_stats(wave: np.ndarray) -> np.ndarray:
    """[38] float64: mean and std over frames of MFCC c1..c19 of a 16-kHz waveform (int16 or float)."""
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    if np.asarray(wave).dtype == np.int16:
        x = x / 32768.0
    with torch.no_grad():
        mfcc = _MFCC(x)[1:]                     # [19, frames]
    return torch.cat([mfcc.mean(1), mfcc.std(1)]).double().numpy()


def score_trials(trials_path: str | Path, audio_root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine scores of the MFCC-statistics baseline for a trial list (read as the evaluator reads it).

    Returns (scores, labels, same_session), same_session marking trials whose two files share the
    `<speaker>/<session>/` folder (VoxCeleb layout).
    """
    trials = read_trials(str(trials_path))
    names = sorted({*trials.enroll, *trials.test})
    stats = []
    for name in names:
        wave, sr = sf.read(Path(audio_root) / name, dtype="int16")
        if sr != SAMPLE_RATE:
            raise ValueError(f"{name}: sample rate {sr}, expected {SAMPLE_RATE}")
        stats.append(mfcc_stats(wave))
    vectors = np.stack(stats)
    vectors = (vectors - vectors.mean(0)) / (vectors.std(0) + 1e-9)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = {name: i for i, name in enumerate(names)}
    a = np.array([index[u] for u in trials.enroll])
    b = np.array([index[u] for u in trials.test])
    scores = np.einsum("ij,ij->i", vectors[a], vectors[b])
    labels = trials.labels.astype(int)
    same_session = np.array([e.rsplit("/", 1)[0] == t.rsplit("/", 1)[0] for e, t in zip(trials.enroll, trials.test)])
    return scores, labels, same_session


def baseline_eers(trials_path: str | Path, audio_root: str | Path) -> dict[str, float]:
    """EER (%) overall, and on same-session / cross-session targets against all non-targets."""
    scores, labels, same = score_trials(trials_path, audio_root)
    nontarget = labels == 0
    result = {"all": eer(scores, labels)}
    for name, targets in (("same_session", (labels == 1) & same), ("cross_session", (labels == 1) & ~same)):
        keep = targets | nontarget
        if targets.any():
            result[name] = eer(scores[keep], labels[keep])
    return {k: round(100 * v, 2) for k, v in result.items()}


if __name__ == "__main__":     # python -m voxstream.model.baseline TRIALS AUDIO_ROOT -> {"all": .., "same_session": .., ...}
    import json
    import sys

    torch.set_num_threads(1)    # one small FFT per frame: extra threads only contend
    print(json.dumps(baseline_eers(sys.argv[1], sys.argv[2])))
