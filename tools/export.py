"""Export a checkpoint's embedder (with its fbank front-end) to TorchScript and ONNX, checked against eager.

    python tools/export.py --checkpoint CKPT --out DIR [--formats torchscript onnx] [--tolerance 1e-4]

The exports take float32 waveforms [batch, samples], mono 16 kHz, and return embeddings [batch, D]
(unnormalised: score with cosine). Each is run on several lengths and compared with the eager network;
a difference above --tolerance is an error and nothing is reported done.
"""
from __future__ import annotations

import argparse
import json
import sys

from voxstream.model import export
from voxstream.model.checkpoint import load_method


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint path or URL written by tools/train.py")
    p.add_argument("--out", required=True, help="folder (path or URL) for the exported files")
    p.add_argument("--formats", nargs="+", default=list(export.FORMATS), choices=list(export.FORMATS))
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |export - eager|")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    args = p.parse_args(argv)
    try:
        method, _ = load_method(args.checkpoint, args.storage_options)
        network = method.embedder()
        written = export.export(network, args.out, args.formats, args.storage_options)
        for name, url in written.items():
            diff = export.check(network, export.load_runner(url, args.storage_options))
            print(f"{name}: {url}  max |export - eager| = {diff:.2e}")
            if diff > args.tolerance:
                print(f"export: error: {name} differs from eager by {diff:.2e} > {args.tolerance:g}", file=sys.stderr)
                return 1
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
