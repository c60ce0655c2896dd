"""Speaker embeddings of a folder, a list or a shard set, as Kaldi ark/scp; resumable.

    python tools/embed.py --checkpoint CKPT --out DIR (--audio-root DIR | --list wav.scp | --shards URL)

--audio-root: every audio file under the folder, keyed by its path without extension
(`id10270/5r0dWxy17C8/00001`). --list: a Kaldi wav.scp (`key path` lines) or one path per line.
--shards: every sample of a shard set, keyed by its sample key. The output is DIR/embeddings.scp
(written last) over DIR/parts/*.ark, read with `kaldiio.load_scp`. Embeddings are L2-normalised and
computed as tools/evaluate.py computes them. Run the same command again after a stop: finished parts
are kept and only the rest is embedded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from voxstream.model.ark import ArkWriter, check_key, embed_to_ark
from voxstream.model.embedder import Embedder
from voxstream.model.embeddings import EmbedOptions, FileAudio, ShardAudio

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".sph"}


def folder_paths(root: str) -> dict[str, str]:
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"--audio-root {root}: not a folder")
    paths: dict[str, str] = {}
    for path in sorted(root_path.rglob("*")):
        if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
            key = check_key(path.relative_to(root_path).with_suffix("").as_posix(), str(path))
            if key in paths:
                raise ValueError(f"{root}: {paths[key]} and {path} both give the key {key}")
            paths[key] = str(path)
    if not paths:
        raise ValueError(f"--audio-root {root}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})")
    return paths


def list_paths(listing: str) -> dict[str, str]:
    paths: dict[str, str] = {}
    base = os.path.dirname(os.path.abspath(listing))
    with open(listing) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2:
                raise ValueError(f"{listing}:{n}: expected 'key path' or 'path', got {line.strip()!r} "
                                 "(piped wav.scp commands are not supported)")
            path = fields[-1]
            key = check_key(fields[0] if len(fields) == 2 else os.path.splitext(path)[0], f"{listing}:{n}")
            if key in paths:
                raise ValueError(f"{listing}:{n}: key {key} listed twice")
            paths[key] = os.path.join(base, path)   # relative paths are relative to the list
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint path or URL written by tools/train.py")
    p.add_argument("--out", required=True, help="output folder (local: scp files name their ark by path)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio-root", help="folder of audio files")
    source.add_argument("--list", help="wav.scp ('key path' lines) or one path per line")
    source.add_argument("--shards", help="shard set URL")
    p.add_argument("--part-size", type=int, default=1000, help="utterances per ark part (the unit of resume)")
    p.add_argument("--batch-size", type=int, default=32, help="waveforms per forward pass")
    p.add_argument("--workers", type=int, default=4, help="audio reading threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    args = p.parse_args(argv)
    if min(args.part_size, args.batch_size, args.workers) < 1:
        p.error("--part-size, --batch-size and --workers must be at least 1")
    opts = EmbedOptions(batch_size=args.batch_size, workers=args.workers)
    try:
        writer = ArkWriter(args.out)
        if args.shards:
            audio = ShardAudio(args.shards, lambda key: None if key in writer.done else check_key(key, args.shards),
                               workers=args.workers, storage_options=args.storage_options)
            total = None
        else:
            paths = folder_paths(args.audio_root) if args.audio_root else list_paths(args.list)
            todo = {k: v for k, v in paths.items() if k not in writer.done}
            audio, total = (FileAudio(todo, args.workers, args.audio_root or args.list) if todo else []), len(todo)
        model = Embedder.load(args.checkpoint, args.device, storage_options=args.storage_options)
        kept = len(writer.done)
        computed = embed_to_ark(model.network, audio, writer, opts, model.device, total, args.part_size)
        failed = getattr(audio, "failed", [])
        if failed:   # an unreadable shard is skipped and named; the set is not reported complete
            print(f"embed: error: {len(failed)} shard(s) unreadable, first: {failed[0]}; "
                  f"run again to finish ({len(writer.done)} embeddings so far)", file=sys.stderr)
            return 1
        scp = writer.finish()
    except (FileNotFoundError, ValueError) as e:
        print(f"embed: error: {e}", file=sys.stderr)
        return 2
    print(f"{scp}: {len(writer.done)} embeddings ({computed} computed, {kept} kept from an earlier run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
