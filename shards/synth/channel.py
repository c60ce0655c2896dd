"""A recording channel per session: microphone/codec band-limits, EQ, level and a noise floor.

VoxCeleb utterances of one video share a microphone, a room and a codec; utterances of two videos
do not. This is what makes cross-session trials harder than same-session ones, and what a channel-
robust embedding has to ignore. The channel is applied as a zero-phase magnitude response on the
rFFT of the whole utterance, then a stationary coloured noise floor is added at a session SNR.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.fft import next_fast_len

FS = 16000


@dataclass(frozen=True)
class Channel:
    low_cut: float          # Hz, high-pass corner (small mics, wind filters)
    high_cut: float         # Hz, low-pass corner (telephone-like 3.4 kHz up to full band)
    peaks: tuple[tuple[float, float, float], ...]   # EQ (centre Hz, gain dB, width octaves)
    tilt: float             # dB/octave around 1 kHz (bright or dull microphone)
    level: float            # dBFS of the utterance RMS
    snr: float              # dB, speech RMS over noise-floor RMS
    noise_colour: float     # spectral slope exponent of the noise floor: 0 white, 1 pink, 2 brown


def random_channel(rng: np.random.Generator) -> Channel:
    """Draw a session channel; the ranges span close-talk studio to distant, noisy and band-limited."""
    n_peaks = int(rng.integers(2, 5))
    peaks = tuple((float(np.exp(rng.uniform(np.log(150), np.log(6000)))), float(rng.normal(0, 5.0)),
                   float(rng.uniform(0.3, 1.5))) for _ in range(n_peaks))
    return Channel(
        low_cut=float(np.exp(rng.uniform(np.log(40), np.log(300)))),
        high_cut=float(rng.choice([3400.0, 4000.0, 5500.0, 7000.0, 7800.0], p=[0.1, 0.15, 0.2, 0.25, 0.3])),
        peaks=peaks,
        tilt=float(rng.normal(0, 1.5)),
        level=float(rng.uniform(-32, -16)),
        snr=float(rng.uniform(10, 40)),
        noise_colour=float(rng.uniform(0, 2)),
    )


def response(channel: Channel, freqs: np.ndarray) -> np.ndarray:
    """Magnitude response of the channel at `freqs` (Hz): Butterworth-like corners, EQ bumps, tilt."""
    f = np.maximum(freqs, 1.0)
    gain = 1 / np.sqrt(1 + (channel.low_cut / f) ** 4) / np.sqrt(1 + (f / channel.high_cut) ** 8)
    octaves = np.log2(f / 1000.0)
    db = channel.tilt * octaves
    for centre, peak_db, width in channel.peaks:
        db = db + peak_db * np.exp(-0.5 * ((np.log2(f / centre)) / (width / 2)) ** 2)
    return gain * 10 ** (db / 20)


def apply_channel(wave: np.ndarray, channel: Channel, rng: np.random.Generator,
                  level_jitter: float = 2.0) -> np.ndarray:
    """Pass `wave` through `channel`, add its noise floor and set its level (+- `level_jitter` dB)."""
    n = wave.size
    size = next_fast_len(n, real=True)     # zero-phase filter: padding only avoids slow prime-length FFTs
    freqs = np.fft.rfftfreq(size, 1 / FS)
    gain = response(channel, freqs)
    speech = np.fft.irfft(np.fft.rfft(wave, size) * gain, size)[:n]
    speech /= np.sqrt(np.mean(speech ** 2)) + 1e-12
    # The noise floor is coloured, and partly shaped by the same microphone.
    floor = np.fft.rfft(rng.standard_normal(size)) * np.maximum(freqs, 20.0) ** (-channel.noise_colour / 2)
    noise = np.fft.irfft(floor * np.sqrt(gain), size)[:n]
    noise *= 10 ** (-channel.snr / 20) / (np.sqrt(np.mean(noise ** 2)) + 1e-12)
    level = channel.level + rng.uniform(-level_jitter, level_jitter)
    return ((speech + noise) * 10 ** (level / 20)).astype(np.float32)
