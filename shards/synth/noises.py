"""MUSAN-like additive sources: coloured and non-stationary noise, and synthetic music.

The augmentation recipe (Kaldi VoxCeleb) mixes noise at 0-15 dB, music at 5-15 dB and babble made
of 3-7 speech clips; these generators give it material with the right variety: stationary noise of
any colour, noise whose level and spectrum move (traffic, machinery, knocks, sirens, hum), and
polyphonic tonal music with percussion. Speech for babble comes from `voice.speak` with held-out
speakers (see corpus.py). Every generator returns float32 at 16 kHz with RMS 0.1.
"""
from __future__ import annotations

import numpy as np
from scipy.fft import next_fast_len

FS = 16000


def _unit(x: np.ndarray) -> np.ndarray:
    return (0.1 * x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def coloured_noise(n: int, colour: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with power spectrum ~ 1/f^colour (0 white, 1 pink, 2 brown, -1 blue), unit RMS."""
    size = next_fast_len(n, real=True)
    slope = np.maximum(np.fft.rfftfreq(size, 1 / FS), 20.0) ** (-colour / 2)
    noise = np.fft.irfft(np.fft.rfft(rng.standard_normal(size)) * slope, size)[:n]
    return noise / (np.sqrt(np.mean(noise ** 2)) + 1e-12)


def _smooth_envelope(n: int, rate: float, depth_db: float, rng: np.random.Generator) -> np.ndarray:
    """A random gain curve with about `rate` changes per second, spanning +-depth_db."""
    knots = np.linspace(0, n, max(2, int(n / FS * rate)) + 2)
    return 10 ** (np.interp(np.arange(n), knots, rng.uniform(-depth_db, depth_db, knots.size)) / 20)


def noise(seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One noise clip and its type: stationary coloured, modulated, passing, hum, siren or knocks."""
    n = int(seconds * FS)
    t = np.arange(n) / FS
    kind = str(rng.choice(["coloured", "modulated", "passing", "hum", "siren", "knocks"]))
    base = coloured_noise(n, rng.uniform(-1, 2.2), rng)
    if kind == "coloured":
        x = base
    elif kind == "modulated":        # machinery, crowds: level moves several times a second
        x = base * _smooth_envelope(n, rng.uniform(1, 8), rng.uniform(6, 20), rng)
    elif kind == "passing":          # a vehicle: slow swell of low-frequency noise
        centre = rng.uniform(0.2, 0.8) * seconds
        x = coloured_noise(n, 2.0, rng) * np.exp(-0.5 * ((t - centre) / rng.uniform(0.5, 2.5)) ** 2) + 0.05 * base
    elif kind == "hum":              # mains hum with harmonics, over a weak floor
        f = rng.choice([50.0, 60.0]) * np.arange(1, 8)
        phases = rng.uniform(0, 2 * np.pi, (f.size, 1))
        x = (rng.uniform(0.2, 1, (f.size, 1)) * np.sin(2 * np.pi * f[:, None] * t + phases)).sum(0)
        x = x / np.std(x) + 0.1 * base
    elif kind == "siren":            # a tone sweeping up and down
        f = rng.uniform(500, 900) + rng.uniform(200, 600) * np.sin(2 * np.pi * rng.uniform(0.2, 2) * t)
        x = np.sin(2 * np.pi * np.cumsum(f) / FS) + 0.2 * base
    else:                            # knocks and clicks: decaying bursts at random times
        x = 0.02 * base
        for at in rng.integers(0, n, int(rng.integers(3, 15))):
            length = int(rng.uniform(0.02, 0.15) * FS)
            burst = coloured_noise(length, rng.uniform(0, 2), rng) * np.exp(-np.arange(length) / (0.2 * length))
            x[at: at + length] += burst[: n - at] * rng.uniform(1, 5)
    return _unit(x), kind


def _note(freq: float, seconds: float, harmonics: np.ndarray, decay: float) -> np.ndarray:
    """An additive-synthesis note: harmonic amplitudes `harmonics`, exponential decay, soft attack."""
    t = np.arange(int(seconds * FS)) / FS
    k = np.arange(1, harmonics.size + 1)[:, None]
    partials = harmonics[:, None] * np.sin(2 * np.pi * freq * k * t) * (freq * k < FS / 2)
    return partials.sum(0) * np.exp(-t / decay) * np.minimum(1, t / 0.01)


def music(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A short synthetic piece: chords and a melody in one key, a bass line, and optional drums."""
    n = int(seconds * FS)
    beat = 60 / rng.uniform(70, 160)
    root = 110 * 2 ** (rng.integers(0, 12) / 12)
    scale = np.array([0, 2, 4, 5, 7, 9, 11]) if rng.random() < 0.6 else np.array([0, 2, 3, 5, 7, 8, 10])
    timbres = [np.exp(-rng.uniform(0.2, 1.2) * np.arange(rng.integers(3, 12))) for _ in range(3)]
    out = np.zeros(n + 4 * FS)
    for step, start in enumerate(np.arange(0, seconds, beat)):
        at = int(start * FS)
        if step % 4 == 0:            # a chord of three scale degrees every bar
            degree = rng.integers(0, 7)
            for d in (0, 2, 4):
                semis = scale[(degree + d) % 7] + 12 * ((degree + d) // 7)
                note = _note(root * 2 ** (semis / 12), 4 * beat, timbres[0], 1.5 * beat)
                out[at: at + note.size] += 0.3 * note
            bass = _note(root / 2 * 2 ** (scale[degree] / 12), 2 * beat, timbres[1], beat)
            out[at: at + bass.size] += 0.5 * bass
        if rng.random() < 0.8:       # melody note, sometimes on the off-beat too
            for off in ((0.0,) if rng.random() < 0.6 else (0.0, 0.5)):
                semis = scale[rng.integers(0, 7)] + 12 * rng.integers(1, 3)
                note = _note(root * 2 ** (semis / 12), beat, timbres[2], 0.5 * beat)
                j = at + int(off * beat * FS)
                out[j: j + note.size] += 0.4 * note
    out = out[:n]
    if rng.random() < 0.6:           # drums: noise bursts on the beats
        hits = np.arange(0, n, int(beat * FS))
        for j, at in enumerate(hits):
            length = min(int(0.08 * FS), n - at)
            colour = 2.0 if j % 2 == 0 else 0.0      # kick-like on the downbeat, snare-like after
            hit = coloured_noise(length, colour, rng) * np.exp(-np.arange(length) / (0.015 * FS))
            out[at: at + length] += 0.5 * hit
    return _unit(out)
