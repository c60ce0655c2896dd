"""Export a speaker embedder with its fbank front-end, for serving without voxstream.

Both formats take float32 waveforms [batch, samples], mono at 16 kHz (mix and resample before),
of any batch size and any length from MIN_SECONDS, and give embeddings [batch, D], not normalised:
score them with cosine. A padded batch changes the statistics pooling, so batch equal lengths only.
- TorchScript (`torch.jit.trace`): ECAPA's loop over a zip of modules cannot be scripted; the trace
  keeps every length-dependent op symbolic, which `check` confirms on lengths other than the traced one.
- ONNX (the torch.export-based exporter, opset 18): the STFT is an ONNX op, batch and length are
  dynamic axes. Needs the `export` extra (onnx, onnxscript); `check` needs onnxruntime.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from voxstream.model.features import SAMPLE_RATE
from voxstream.shards import storage

MIN_SECONDS = 0.5
EXAMPLE_SECONDS = 3.0
FORMATS = {"torchscript": "embedder.torchscript.pt", "onnx": "embedder.onnx"}


def _example(batch: int = 2, seconds: float = EXAMPLE_SECONDS) -> torch.Tensor:
    return 0.1 * torch.randn(batch, round(seconds * SAMPLE_RATE), generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _quiet():
    """torch.jit warns it is deprecated (services still load it), the ONNX exporter logs each pass."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def torchscript_bytes(network: nn.Module) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad(), _quiet():
        torch.jit.save(torch.jit.trace(network.eval().cpu(), _example(), check_trace=False), buf)
    return buf.getvalue()


def onnx_bytes(network: nn.Module) -> bytes:
    try:
        import onnx  # noqa: F401  the exporter imports it lazily and fails deep inside otherwise
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"ONNX export needs onnx and onnxscript: pip install 'voxstream[export]' ({e})") from None
    batch, samples = torch.export.Dim("batch"), torch.export.Dim("samples", min=round(MIN_SECONDS * SAMPLE_RATE))
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        path = Path(tmp) / "embedder.onnx"
        torch.onnx.export(network.eval().cpu(), (_example(),), str(path), dynamo=True, verbose=False,
                          input_names=["wave"], output_names=["embedding"],
                          dynamic_shapes=({0: batch, 1: samples},), external_data=False)
        return path.read_bytes()


def load_runner(url: str, storage_options: dict | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function waveforms [B, T] -> embeddings [B, D] running an exported file, by its extension."""
    data = storage.read_bytes(url, storage_options)
    if url.endswith(".onnx"):
        import onnxruntime
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        return lambda wave: session.run(None, {"wave": np.asarray(wave, dtype=np.float32)})[0]
    with _quiet():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return lambda wave: module(torch.as_tensor(wave, dtype=torch.float32)).detach().numpy()


def check(network: nn.Module, run: Callable[[np.ndarray], np.ndarray], seconds=(0.5, 1.37, 4.0, 9.21)) -> float:
    """The largest absolute difference between an export and the eager network, over real lengths."""
    network = network.eval().cpu()
    worst = 0.0
    for k, s in enumerate(seconds):
        wave = _example(batch=1 + k % 3, seconds=s)
        with torch.no_grad():
            eager = network(wave).numpy()
        worst = max(worst, float(np.abs(run(wave.numpy()) - eager).max()))
    return worst


def export(network: nn.Module, out: str, formats: list[str], storage_options: dict | None = None) -> dict[str, str]:
    """Write each format into the folder `out` (a path or fsspec URL), atomically; returns their URLs."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    written = {}
    for name in formats:
        data = torchscript_bytes(network) if name == "torchscript" else onnx_bytes(network)
        written[name] = storage.join(out, FORMATS[name])
        storage.write_bytes(written[name], data, storage_options)
    return written
