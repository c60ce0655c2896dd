"""Front-end and encoders: shapes, pinned parameter counts, fp32 features under autocast."""
from __future__ import annotations

import math

import pytest
import torch

from voxstream.model.encoders import EncoderConfig, build_encoder
from voxstream.model.features import Fbank


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_fbank_frames_bins_and_mean_normalisation():
    wave = torch.randn(3, 16000)
    x = Fbank()(wave)
    assert x.shape == (3, 80, 101)  # 10 ms hop, centred frames
    assert x.dtype == torch.float32
    assert x.mean(dim=-1).abs().max() < 1e-4


def test_fbank_ignores_a_constant_gain():
    """Per-utterance mean normalisation removes a constant channel gain (log of a scale); only
    bins near the log floor may differ."""
    t = torch.arange(16000) / 16000
    noise = torch.randn(16000, generator=torch.Generator().manual_seed(0))
    wave = (torch.sin(2 * math.pi * 220 * t) + 0.1 * noise).unsqueeze(0)
    fb = Fbank()
    torch.testing.assert_close(fb(wave), fb(4 * wave), atol=1e-2, rtol=0)


def test_fbank_stays_fp32_under_autocast():
    fb = Fbank()
    wave = torch.randn(2, 8000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = fb(wave.bfloat16())
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, fb(wave.bfloat16().float()))


@pytest.mark.parametrize("cfg, count", [
    (EncoderConfig("ecapa", 512, 192), 6_194_432),
    (EncoderConfig("ecapa", 1024, 192), 14_660_800),
    (EncoderConfig("resnet34", 128, 256), 1_453_334),
])
def test_published_sizes(cfg, count):
    """ECAPA-TDNN C=512/1024: 6.2 M / 14.7 M (Desplanques et al.); thin ResNet-34: about 1.4 M."""
    assert n_params(build_encoder(cfg)) == count


@pytest.mark.parametrize("cfg", [EncoderConfig("ecapa", 32, 24), EncoderConfig("resnet34", 32, 24)])
def test_encoder_maps_waves_to_embeddings(cfg):
    enc = build_encoder(cfg)
    assert enc(torch.randn(4, 8000)).shape == (4, 24)
    enc.eval()  # any duration in evaluation, a per-utterance embedding for each
    one = enc(torch.randn(1, 24000))
    assert one.shape == (1, 24) and torch.isfinite(one).all()


def test_encoder_under_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig("ecapa", 64, 32)).eval()
    wave = torch.randn(2, 16000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = enc(wave)
    ref = enc(wave)
    assert torch.nn.functional.cosine_similarity(low.float(), ref).min() > 0.98


def test_bad_encoder_config_names_the_key():
    with pytest.raises(ValueError, match="model.name"):
        build_encoder(EncoderConfig("transformer"))
    with pytest.raises(ValueError, match="model.channels"):
        build_encoder(EncoderConfig("ecapa", channels=100))
