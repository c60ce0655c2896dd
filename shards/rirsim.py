"""Room impulse responses simulated with pyroomacoustics, in the style of Kaldi's simulated RIRs.

Kaldi's RIRS_NOISES/simulated_rirs draws shoebox rooms of two size classes (small: length and
width 1-10 m; medium: 10-30 m; height 2-5 m for both), a uniform wall absorption coefficient
in 0.2-0.8, and a source placed within 5 m of the microphone. This module is the one simulator
of the project: the demo corpus (`shards.synth.corpus`) and `make_shards.py simulate-rir` both
call `simulate_rir`, so every simulated RIR in the system has the same distribution.

Usage:
    rng = np.random.default_rng(seed)
    rir, meta = simulate_rir(rng, "smallroom")   # float32 [n], peak 0.9; meta is JSON-ready
"""
from __future__ import annotations

import numpy as np
import pyroomacoustics as pra

SAMPLE_RATE = 16000
ROOM_CLASSES = {"smallroom": (1.0, 10.0), "mediumroom": (10.0, 30.0)}   # length/width range, metres
HEIGHT = (2.0, 5.0)
ABSORPTION = (0.2, 0.8)
MAX_SOURCE_DISTANCE = 5.0
# Image-source order, set explicitly (pyroomacoustics' default of 1 gives no reverberant tail):
# high enough that the tail covers most of the RT60 (0.1-1 s), low enough for ~50 ms per room.
MAX_ORDER = {"smallroom": 40, "mediumroom": 30}
MAX_SECONDS = 1.0          # cap on the stored length; the image-source tail is negligible beyond
WALL_MARGIN = 0.5          # keep source and mic this far from the walls (metres)


def _inside(rng: np.random.Generator, dims: np.ndarray) -> np.ndarray:
    margin = np.minimum(WALL_MARGIN, dims / 4)
    return rng.uniform(margin, dims - margin)


def _source_near(rng: np.random.Generator, dims: np.ndarray, mic: np.ndarray) -> np.ndarray:
    """A source position inside the room and within MAX_SOURCE_DISTANCE of the mic (rejection sampling)."""
    for _ in range(1000):
        src = _inside(rng, dims)
        if 0.3 <= np.linalg.norm(src - mic) <= MAX_SOURCE_DISTANCE:
            return src
    # A room too small for 0.3 m separation cannot happen with the size classes above; fail loudly.
    raise RuntimeError(f"no source position within {MAX_SOURCE_DISTANCE} m of the mic in room {dims}")


def simulate_rir(rng: np.random.Generator, room_class: str, room: dict | None = None) -> tuple[np.ndarray, dict]:
    """One RIR of `room_class` ("smallroom" | "mediumroom") at 16 kHz.

    A new room is drawn unless `room` (the meta of an earlier call) is given: then its dims and
    absorption are kept and only the mic and source move, as in Kaldi's RoomN/ folders.

    Returns (rir, meta): rir is float32, trimmed to the point where its energy decay falls 60 dB
    below the total (at most MAX_SECONDS) and scaled to peak 0.9 so it survives 16-bit storage;
    meta holds room_class, dims, absorption, mic, source, distance, rt60 (Sabine estimate) and
    max_order, all plain floats/lists. Deterministic for the state of `rng`.
    """
    if room_class not in ROOM_CLASSES:
        raise ValueError(f"room_class must be one of {sorted(ROOM_CLASSES)}, got {room_class!r}")
    if room is None:
        lo, hi = ROOM_CLASSES[room_class]
        dims = np.array([rng.uniform(lo, hi), rng.uniform(lo, hi), rng.uniform(*HEIGHT)])
        absorption = float(rng.uniform(*ABSORPTION))
    else:
        dims, absorption = np.array(room["dims"], dtype=np.float64), float(room["absorption"])
    mic = _inside(rng, dims)
    src = _source_near(rng, dims, mic)

    room = pra.ShoeBox(dims, fs=SAMPLE_RATE, materials=pra.Material(absorption),
                       max_order=MAX_ORDER[room_class], air_absorption=False)
    room.add_source(src)
    room.add_microphone(mic)
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float64)

    # Trim the silent tail: keep samples until the remaining energy is 60 dB below the total.
    remaining = np.cumsum((rir ** 2)[::-1])[::-1]
    end = int(np.searchsorted(-remaining, -remaining[0] * 1e-6)) + 1
    rir = rir[: min(end, int(MAX_SECONDS * SAMPLE_RATE))]
    rir = (0.9 * rir / np.abs(rir).max()).astype(np.float32)

    volume = float(np.prod(dims))
    surface = float(2 * (dims[0] * dims[1] + dims[0] * dims[2] + dims[1] * dims[2]))
    meta = {
        "room_class": room_class,
        "dims": [round(float(d), 3) for d in dims],
        "absorption": round(absorption, 4),
        "mic": [round(float(x), 3) for x in mic],
        "source": [round(float(x), 3) for x in src],
        "distance": round(float(np.linalg.norm(src - mic)), 3),
        "rt60": round(0.161 * volume / (surface * absorption), 4),
        "max_order": MAX_ORDER[room_class],
        "sample_rate": SAMPLE_RATE,
    }
    return rir, meta
