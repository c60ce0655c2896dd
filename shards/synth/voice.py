"""A per-speaker source-filter voice that speaks random phone-like utterances.

The source is a jittered, shimmered glottal pulse train plus breath noise; the filter is a
time-varying cascade of formant resonators whose frequencies scale with the speaker's vocal-tract
length. Consonants are shaped noise: fricatives (band-pass), plosives (closure, then a burst),
nasals (low-passed voicing). Filtering happens frame by frame in the STFT domain, so a 10-s
utterance costs a handful of vectorised FFTs, not a per-sample recursion.

What makes speakers differ (and so what a speaker embedding can learn): f0 level and range,
formant scaling plus small per-formant offsets, bandwidths, spectral tilt, jitter, shimmer,
breathiness and speaking rate. What makes utterances of one speaker differ: the phone sequence,
the intonation, and a per-session drift (`Voice.drift`) of pitch, effort and rate.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

FS = 16000
N_FFT, HOP = 512, 128                     # 32-ms frames, 8-ms hop (hann^2 at hop N/4 sums to 1.5)
FREQS = np.fft.rfftfreq(N_FFT, 1 / FS)
OMEGA = 2 * np.pi * FREQS / FS

# Adult-male vowel formants F1-F3 (Hillenbrand et al. 1995); F4, F5 fixed. Scaled per speaker.
VOWELS = np.array([
    [342, 2322, 3000], [427, 2034, 2684], [476, 2089, 2691], [580, 1799, 2605],
    [588, 1952, 2601], [768, 1333, 2522], [652, 997, 2538], [497, 910, 2459],
    [469, 1122, 2434], [378, 997, 2343], [623, 1200, 2550], [474, 1379, 1710],
], dtype=np.float64)
HIGH_FORMANTS = np.array([3500.0, 4500.0])
BANDWIDTHS = np.array([80.0, 100.0, 140.0, 200.0, 280.0])
NASAL_FORMANTS = np.array([260.0, 1050.0, 2300.0, 3400.0, 4400.0])
# Consonant noise: (centre Hz, width in octaves) for fricative places (f, s, sh, h-like) and burst places.
FRICATIVES = np.array([[6000.0, 1.6], [5800.0, 0.6], [3200.0, 0.7], [1800.0, 1.8]])
BURSTS = np.array([[1000.0, 1.5], [4000.0, 1.0], [2200.0, 0.8]])

SILENCE, VOWEL, NASAL, FRICATIVE, CLOSURE, BURST = range(6)


@dataclass(frozen=True)
class Voice:
    """Speaker (or speaker-in-a-session) parameters; everything the synthesiser needs."""
    f0: float              # median pitch, Hz
    f0_range: float        # intonation spread, semitones (sd)
    formant_scale: float   # 1 / relative vocal-tract length
    formant_offsets: tuple[float, ...]   # per-formant multiplicative offsets (5)
    bandwidth_scale: float
    tilt: float            # spectral tilt of the voiced source, dB/octave above 200 Hz
    jitter: float          # cycle-to-cycle period perturbation, fraction of a period
    shimmer: float         # cycle-to-cycle amplitude perturbation, log-amplitude sd
    breathiness: float     # aspiration noise relative to the pulses
    rate: float            # phones per second
    vowel_weights: tuple[float, ...]     # how often each vowel is used (an accent, of sorts)

    def drift(self, rng: np.random.Generator) -> Voice:
        """The same speaker on another day: pitch, vocal effort (tilt) and rate move a little."""
        return replace(self,
                       f0=self.f0 * 2 ** (rng.normal(0, 1.0) / 12),
                       tilt=self.tilt + rng.normal(0, 1.0),
                       rate=self.rate * np.exp(rng.normal(0, 0.06)),
                       breathiness=self.breathiness * np.exp(rng.normal(0, 0.2)))


def random_voice(rng: np.random.Generator) -> Voice:
    """Draw a speaker: male or female pitch and vocal-tract length, then individual variation."""
    female = rng.random() < 0.5
    f0 = np.exp(rng.normal(np.log(205.0 if female else 118.0), 0.13))
    return Voice(
        f0=float(f0),
        f0_range=float(rng.uniform(1.5, 4.0)),
        formant_scale=float(rng.normal(1.16 if female else 1.0, 0.045)),
        formant_offsets=tuple(np.exp(rng.normal(0, 0.035, 5)).tolist()),
        bandwidth_scale=float(rng.uniform(0.8, 1.5)),
        tilt=float(rng.uniform(-10.0, -3.0)),
        jitter=float(rng.uniform(0.004, 0.02)),
        shimmer=float(rng.uniform(0.03, 0.15)),
        breathiness=float(rng.uniform(0.02, 0.3)),
        rate=float(rng.uniform(9.0, 14.0)),
        vowel_weights=tuple(rng.dirichlet(np.full(len(VOWELS), 2.0)).tolist()),
    )


# ----------------------------------------------------------------------------- phone sequence

def _phones(voice: Voice, seconds: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random syllables (onset consonant, vowel, optional coda) with phrase pauses, until `seconds`.

    Returns per-segment arrays: kind, start and end (s), vowel index, consonant place, gain.
    """
    segments: list[tuple[int, float, int, int, float]] = []      # kind, seconds, vowel, place, gain
    mean = 1.0 / voice.rate

    def add(kind: int, dur: float, v: int = -1, p: int = 0, g: float = 1.0) -> None:
        segments.append((kind, dur, v, p, g))

    t, phrase_left = rng.uniform(0.05, 0.3), rng.integers(4, 13)
    add(SILENCE, t)
    while t < seconds or not any(seg[0] == VOWEL for seg in segments):
        onset = rng.random()
        if onset < 0.3:
            add(FRICATIVE, mean * rng.uniform(0.7, 1.3), p=rng.integers(len(FRICATIVES)), g=rng.uniform(0.15, 0.4))
        elif onset < 0.6:
            add(CLOSURE, mean * rng.uniform(0.4, 0.8), g=0.0)
            add(BURST, rng.uniform(0.012, 0.03), p=rng.integers(len(BURSTS)), g=rng.uniform(0.3, 0.6))
        elif onset < 0.8:
            add(NASAL, mean * rng.uniform(0.6, 1.1), g=rng.uniform(0.25, 0.45))
        stress = np.exp(rng.normal(0, 0.3))
        add(VOWEL, mean * rng.uniform(1.0, 2.2) * stress ** 0.5,
            v=rng.choice(len(VOWELS), p=voice.vowel_weights), g=stress)
        if rng.random() < 0.3:
            add(FRICATIVE, mean * rng.uniform(0.6, 1.2), p=rng.integers(len(FRICATIVES)), g=rng.uniform(0.1, 0.3))
        phrase_left -= 1
        if phrase_left == 0:
            add(SILENCE, rng.uniform(0.15, 0.5))
            phrase_left = rng.integers(4, 13)
        t = sum(seg[1] for seg in segments)
    kind, dur, vowel, place, gain = (np.array(column) for column in zip(*segments))
    end = np.cumsum(dur)
    return {"kind": kind, "start": end - dur, "end": end, "vowel": vowel, "place": place, "gain": gain}


# ----------------------------------------------------------------------------- source

def _glottal_source(voice: Voice, n: int, rng: np.random.Generator) -> np.ndarray:
    """Jittered, shimmered pulse train along a smooth random f0 contour, plus pulsed breath noise."""
    seconds = n / FS
    knots = np.linspace(0, seconds, max(2, int(seconds / 0.25)) + 1)
    semitones = rng.normal(0, voice.f0_range, knots.size) - 2.0 * knots / max(seconds, 1e-9)   # declination
    f0 = voice.f0 * 2 ** (np.interp(np.arange(n) / FS, knots, semitones) / 12)
    phase = np.cumsum(f0) / FS
    cycles = np.arange(1, int(phase[-1]))
    at = np.searchsorted(phase, cycles + voice.jitter * rng.standard_normal(cycles.size))
    keep = at < n
    source = np.zeros(n)
    # Each pulse carries one period's worth of energy, so loudness does not depend on pitch.
    shimmer = np.exp(voice.shimmer * rng.standard_normal(keep.sum()))
    np.add.at(source, at[keep], shimmer * np.sqrt(FS / f0[at[keep]]))
    breath = rng.standard_normal(n) * (0.6 + 0.4 * np.cos(2 * np.pi * phase))
    return source + voice.breathiness * 3.0 * breath


# ----------------------------------------------------------------------------- filters

def _resonators(formants: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Magnitude of a cascade of unit-DC-gain two-pole resonators, [frames, bins] from [frames, K].

    |1 - 2r cos(t) z^-1 + r^2 z^-2|^2 factorises into (1 - 2r cos(w-t) + r^2)(1 - 2r cos(w+t) + r^2),
    which keeps the [frames, bins, K] work in real float32 arithmetic.
    """
    r = np.exp(-np.pi * bandwidths / FS).astype(np.float32)[:, None, :]
    theta = (2 * np.pi * formants / FS).astype(np.float32)[:, None, :]
    w = OMEGA.astype(np.float32)[None, :, None]
    one_r2 = 1 + r * r
    power = (one_r2 - 2 * r * np.cos(w - theta)) * (one_r2 - 2 * r * np.cos(w + theta))
    dc = (one_r2 - 2 * r * np.cos(theta)) ** 2
    return np.sqrt(np.prod(dc / power, axis=-1))


def _every(step: int, envelope, *tracks: np.ndarray) -> np.ndarray:
    """`envelope(*tracks)` evaluated on every `step`-th frame and linearly interpolated in between.

    Formants move slowly next to a 32-ms frame, and the resonator cascade is the costliest step.
    """
    n = tracks[0].shape[0]
    coarse = envelope(*(t[::step] for t in tracks))
    pos = np.arange(n) / step
    lo = np.minimum(pos.astype(int), coarse.shape[0] - 1)
    hi = np.minimum(lo + 1, coarse.shape[0] - 1)
    frac = (pos - lo)[:, None]
    return coarse[lo] * (1 - frac) + coarse[hi] * frac


def _bandpass(centre: np.ndarray, octaves: np.ndarray) -> np.ndarray:
    """Gaussian bumps on a log-frequency axis, [frames, bins]."""
    dist = np.log2(np.maximum(FREQS, 50.0))[None, :] - np.log2(centre)[:, None]
    return np.exp(-0.5 * (dist / (octaves[:, None] / 2)) ** 2)


def _frame_tracks(voice: Voice, seg: dict[str, np.ndarray], n_frames: int) -> dict[str, np.ndarray]:
    """Per-frame formants and gains: formants glide between vowel targets (coarticulation)."""
    t = np.arange(n_frames) * HOP / FS
    idx = np.clip(np.searchsorted(seg["end"], t, side="right"), 0, len(seg["end"]) - 1)
    kind = seg["kind"][idx]
    is_vowel = seg["kind"] == VOWEL
    centres = (seg["start"] + seg["end"])[is_vowel] / 2
    targets = np.hstack([VOWELS[seg["vowel"][is_vowel]], np.tile(HIGH_FORMANTS, (is_vowel.sum(), 1))])
    formants = np.stack([np.interp(t, centres, targets[:, k]) for k in range(5)], axis=1)
    formants = np.where((kind == NASAL)[:, None], NASAL_FORMANTS, formants)
    formants = np.minimum(formants * voice.formant_scale * np.array(voice.formant_offsets), 0.45 * FS)

    g = seg["gain"][idx]
    voiced = np.where((kind == VOWEL) | (kind == NASAL), g, 0.0)
    noisy = np.where((kind == FRICATIVE) | (kind == BURST), g, 0.0)
    place = seg["place"][idx]
    noise_shape = np.where((kind == BURST)[:, None], BURSTS[place % len(BURSTS)],
                           FRICATIVES[place % len(FRICATIVES)])
    smooth = np.array([0.25, 0.5, 0.25])  # 3-frame ramps: no clicks at segment edges
    return {"formants": formants, "kind": kind,
            "voiced": np.convolve(voiced, smooth, "same"), "noisy": np.convolve(noisy, smooth, "same"),
            "noise_centre": noise_shape[:, 0] * np.sqrt(voice.formant_scale), "noise_width": noise_shape[:, 1]}


# ----------------------------------------------------------------------------- STFT helpers

_WINDOW = np.hanning(N_FFT + 1)[:-1]


def _stft(x: np.ndarray, n_frames: int) -> np.ndarray:
    padded = np.pad(x, (N_FFT // 2, n_frames * HOP + N_FFT // 2 - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:n_frames]
    return np.fft.rfft(frames * _WINDOW, axis=1)


def _istft(spec: np.ndarray, n: int) -> np.ndarray:
    frames = np.fft.irfft(spec, N_FFT, axis=1) * _WINDOW
    n_frames, parts = frames.shape[0], N_FFT // HOP
    out = np.zeros((n_frames + parts) * HOP)
    chunks = frames.reshape(n_frames, parts, HOP)
    for j in range(parts):      # overlap-add as `parts` strided adds, not a loop over frames
        out[j * HOP: j * HOP + n_frames * HOP] += chunks[:, j, :].reshape(-1)
    return out[N_FFT // 2: N_FFT // 2 + n] / 1.5


# ----------------------------------------------------------------------------- utterance

def speak(voice: Voice, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """`seconds` of speech by `voice` at 16 kHz, float32 with RMS 0.1 over the whole utterance."""
    n = int(round(seconds * FS))
    n_frames = n // HOP + 1
    tracks = _frame_tracks(voice, _phones(voice, seconds, rng), n_frames)

    tilt = (1 + (FREQS / 200.0) ** 2) ** (voice.tilt / 12.04)   # -> tilt dB/oct well above 200 Hz
    bandwidths = BANDWIDTHS * voice.bandwidth_scale * np.where(tracks["kind"] == NASAL, 1.8, 1.0)[:, None]
    voiced_env = _every(4, _resonators, tracks["formants"], bandwidths) * tilt
    # Nasal murmur: the oral tract is closed, so energy above ~500 Hz is strongly damped.
    voiced_env *= np.where((tracks["kind"] == NASAL)[:, None], 1 / (1 + (FREQS / 500.0) ** 2), 1.0)
    noise_env = _bandpass(tracks["noise_centre"], tracks["noise_width"])
    # Unit-power envelopes (both sources have unit power per sample), so the segment gains alone
    # set the level of each phone: vowels 0 dB, nasals about -10, fricatives and bursts -10 to -20.
    voiced_env *= (tracks["voiced"] / np.sqrt(np.mean(voiced_env ** 2, axis=1)))[:, None]
    noise_env *= (tracks["noisy"] / np.sqrt(np.mean(noise_env ** 2, axis=1)))[:, None]

    spec = (_stft(_glottal_source(voice, n, rng), n_frames) * voiced_env
            + _stft(rng.standard_normal(n), n_frames) * noise_env)
    wave = _istft(spec, n)
    return (0.1 * wave / (np.sqrt(np.mean(wave ** 2)) + 1e-12)).astype(np.float32)
