"""Corpus adapters: walk a source tree and list its utterances with speaker, session and group.

Each adapter returns a `Listing`: the recordings to shard, in a sorted (deterministic) order, the files
found but deliberately not sharded (with the reason, so they land in rejected.jsonl), and how to
read a recording. Listing reads no audio, so it stays fast on millions of files.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from voxstream.shards.audio import AUDIO_EXTENSIONS, read_audio
from voxstream.shards.format import sample_key


class BadInput(ValueError):
    """An input problem that stops the run before any work, with one line saying what to fix."""


@dataclass(frozen=True)
class Recording:
    """One input of a listing: an audio file, or audio its reader generates, and who speaks in it."""
    source: str                 # the file, or a description of generated audio
    speaker: str | None
    session: str | None
    utt: str
    group: str                  # unit of cross-utterance positives; contiguous in shards
    extra: tuple = ()           # (name, value) pairs added to the sample JSON: kind, room


Reader = Callable[[Recording], tuple[np.ndarray, int, dict]]


def read_file(item: Recording, channel: str = "mix") -> tuple[np.ndarray, int, dict]:
    wave, rate = read_audio(item.source, channel)
    return wave, rate, {}


@dataclass
class Listing:
    corpus: str
    items: list[Recording]
    skipped: list[dict] = field(default_factory=list)   # {"source" (relative to the root), "reason"}
    reader: Reader = read_file
    params: dict = field(default_factory=dict)           # recorded in the manifest


def walk(root: str, extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> list[str]:
    """Sorted paths (relative to root, with /) of the files with these extensions."""
    if not os.path.isdir(root):
        raise BadInput(f"--root {root}: no such directory")
    found = []
    for parent, dirs, files in os.walk(root, followlinks=True):
        rel = os.path.relpath(parent, root)
        found += [f if rel == "." else f"{rel}/{f}" for f in files if f.lower().endswith(extensions)]
    if not found:
        raise BadInput(f"--root {root}: no audio files ({', '.join(e[1:] for e in extensions)}) under it")
    return sorted(found)


def _group(corpus: str, *parts: str | None) -> str:
    return "/".join([corpus, *(p or "unknown" for p in parts)])


def _check_unique(items: list[Recording], corpus: str, hint: str) -> None:
    seen: dict[str, str] = {}
    for it in items:
        key = sample_key(corpus, it.speaker, it.session, it.utt)
        if key in seen:
            raise BadInput(f"{seen[key]} and {it.source} both map to sample key {key}; {hint}")
        seen[key] = it.source


def folder(root: str, pattern: str | None = None, corpus: str = "folder") -> Listing:
    """Any tree of audio. Named groups speaker/session/utt in `pattern` (searched in the relative path)
    give the metadata; without speaker or session the utterance is its own group and is named by its
    whole relative path, so same-named files in different folders stay distinct."""
    regex = _compile(pattern)
    items, skipped = [], []
    for rel in walk(root):
        found = regex.search(rel) if regex else None
        if regex and not found:
            skipped.append({"source": rel, "reason": f"path does not match --pattern {pattern}"})
            continue
        groups = found.groupdict() if found else {}
        speaker, session = groups.get("speaker"), groups.get("session")
        structured = speaker is not None or session is not None
        utt = groups.get("utt") or (Path(rel).stem if structured else str(Path(rel).with_suffix("")))
        group = _group(corpus, speaker, session) if structured else _group(corpus, utt)
        items.append(Recording(str(Path(root, rel)), speaker, session, utt, group))
    _check_unique(items, corpus, "add (?P<utt>...) or (?P<session>...) to --pattern")
    return Listing(corpus, items, skipped, params={"root": root, "pattern": pattern})


def _compile(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise BadInput(f"--pattern {pattern!r}: {e}") from None


VOXCELEB = re.compile(r"(?:^|/)(?P<speaker>id\d+)/(?P<session>[^/]+)/(?P<utt>[^/.]+)\.(?:wav|m4a|flac)$")


def voxceleb(root: str, exclude: list[str] = (), corpus: str = "voxceleb") -> Listing:
    """VoxCeleb1 wav/<id>/<video>/<n>.wav and VoxCeleb2 dev/aac/<id>/<video>/<n>.m4a (or converted to wav)."""
    banned = excluded_speakers(exclude)
    items, skipped, excluded = [], [], 0
    for rel in walk(root, (".wav", ".m4a", ".flac")):
        found = VOXCELEB.search(rel)
        if not found:
            skipped.append({"source": rel, "reason": "not in the VoxCeleb layout <id>/<video>/<n>.wav"})
            continue
        speaker, session, utt = found.group("speaker", "session", "utt")
        if speaker in banned:
            excluded += 1
            continue
        items.append(Recording(str(Path(root, rel)), speaker, session, utt, _group(corpus, speaker, session)))
    if any(it.source.endswith(".m4a") for it in items) and shutil.which("ffmpeg") is None:
        raise BadInput(f"{root} holds .m4a files and no ffmpeg is on PATH: install ffmpeg, or convert first with "
                       f"find {root} -name '*.m4a' -exec sh -c 'ffmpeg -v error -i \"$0\" \"${{0%.m4a}}.wav\" && rm \"$0\"' {{}} \\;")
    if not items:
        raise BadInput(f"--root {root}: no VoxCeleb utterances left ({excluded} excluded, {len(skipped)} off-layout)")
    return Listing(corpus, items, skipped, params={"root": root, "excluded_speakers": len(banned),
                                                   "excluded_utterances": excluded})


def excluded_speakers(paths: list[str]) -> set[str]:
    """Speaker ids from plain lists (one id a line) or trial lists (`label enroll test` with id/video/n.wav)."""
    speakers = set()
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise BadInput(f"--exclude-speakers {path}: {e.strerror}") from None
        for line in lines:
            tokens = line.split()
            speakers.update(t.split("/")[0] for t in tokens if "/" in t)
            if len(tokens) == 1 and "/" not in tokens[0]:
                speakers.add(tokens[0])
    return speakers


MUSAN_KINDS = ("music", "noise", "speech")


def musan(root: str, corpus: str = "musan") -> Listing:
    """MUSAN: <kind>/<subset>/<file>.wav with kind music/noise/speech; every file is its own group."""
    if not any(os.path.isdir(os.path.join(root, k)) for k in MUSAN_KINDS):
        raise BadInput(f"--root {root}: not a MUSAN tree (no music/, noise/ or speech/ folder)")
    items, skipped = [], []
    for rel in walk(root):
        parts = rel.split("/")
        if parts[0] not in MUSAN_KINDS:
            skipped.append({"source": rel, "reason": "outside music/, noise/, speech/"})
            continue
        kind, utt = parts[0], Path(rel).stem
        subset = parts[1] if len(parts) > 2 else kind
        items.append(Recording(str(Path(root, rel)), None, subset, utt, _group(corpus, kind, subset, utt),
                               (("kind", kind),)))
    _check_unique(items, corpus, "MUSAN file names are expected to be unique within a subset")
    return Listing(corpus, items, skipped, params={"root": root})


SIMULATED_RIR = re.compile(r"simulated_rirs/(?P<room>small|medium|large)room/(?P<session>[^/]+)/(?P<utt>[^/]+)\.wav$")
REAL_RIR = re.compile(r"real_rirs_isotropic_noises/(?P<utt>[^/]+)\.wav$")


def rir(root: str, corpus: str = "rir") -> Listing:
    """RIRS_NOISES: simulated_rirs/{small,medium,large}room/RoomN/*.wav and real_rirs_isotropic_noises.

    RIRs of one simulated room form a group. Real multi-microphone RIRs keep their first channel
    (see read_audio). Isotropic and point-source noises are not RIRs: listed as skipped.
    """
    items, skipped = [], []
    for rel in walk(root, (".wav",)):
        source = str(Path(root, rel))
        if found := SIMULATED_RIR.search(rel):
            room, utt = found.group("room", "utt")
            session = f"{room}room_{found.group('session')}"  # Room001 exists in every size class
            group = _group(corpus, session)
        elif (found := REAL_RIR.search(rel)) and "noise" not in found.group("utt").lower():
            utt, session = found.group("utt"), "real"
            size = re.search(r"(small|medium|large)room", utt)
            room = size.group(1) if size else "real"
            group = _group(corpus, session, utt)
        else:
            skipped.append({"source": rel, "reason": "not an RIR of the RIRS_NOISES layout (a noise, or another folder)"})
            continue
        items.append(Recording(source, None, session, utt, group, (("kind", "rir"), ("room", room))))
    if not items:
        raise BadInput(f"--root {root}: no RIRs in the RIRS_NOISES layout (simulated_rirs/<size>room/RoomN/*.wav)")
    _check_unique(items, corpus, "RIR file names are expected to be unique within a room")
    return Listing(corpus, items, skipped, reader=functools.partial(read_file, channel="first"),
                   params={"root": root})


def simulated_rirs(count: int, per_room: int = 10, seed: int = 0, corpus: str = "simrir") -> Listing:
    """`count` RIRs from pyroomacoustics rooms (shards.rirsim), `per_room` per room as Kaldi's RoomN
    folders, room classes alternating; every RIR is a function of (seed, room, index) alone, so any
    worker can make any of them."""
    from voxstream.shards.rirsim import ROOM_CLASSES

    if count < 1 or per_room < 1:
        raise BadInput(f"--count {count} and --per-room {per_room} must be positive")
    classes = sorted(ROOM_CLASSES)
    items = []
    for i in range(count):
        room, index = divmod(i, per_room)
        size = classes[room % len(classes)]
        session = f"{size}_Room{room:04d}"
        items.append(Recording(f"simulated/{size}/{room}/{index}", None, session, f"Room{room:04d}-{index:04d}",
                               _group(corpus, session), (("kind", "rir"),)))
    return Listing(corpus, items, reader=functools.partial(simulate_item, seed=seed),
                   params={"count": count, "per_room": per_room, "simulator": "voxstream.shards.rirsim"})


def simulate_item(item: Recording, seed: int) -> tuple[np.ndarray, int, dict]:
    """The RIR an item of simulated_rirs names: the room's first RIR fixes its dims and absorption."""
    from voxstream.shards.rirsim import SAMPLE_RATE, simulate_rir

    _, size, room, index = item.source.split("/")
    rir, meta = _first_rir(seed, size, int(room))
    if int(index):
        rir, meta = simulate_rir(np.random.default_rng([seed, int(room), int(index)]), size, room=meta)
    return rir, SAMPLE_RATE, {"room": size.removesuffix("room"), "simulation": _renamed(meta)}


@functools.lru_cache(maxsize=16)
def _first_rir(seed: int, size: str, room: int) -> tuple[np.ndarray, dict]:
    from voxstream.shards.rirsim import simulate_rir

    return simulate_rir(np.random.default_rng([seed, room]), size)


def _renamed(meta: dict) -> dict:
    # "source" and "sample_rate" mean other things in the sample JSON: keep the simulator's apart
    return {("source_position" if k == "source" else k): v for k, v in meta.items() if k != "sample_rate"}
