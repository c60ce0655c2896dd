"""Device augmentation: SNR, alignment, per-sample draws, banks and their budget, silent inputs."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from voxstream.pipeline.augment import CATEGORIES, NOISE, REVERB, Augmenter, AugmentConfig, power
from voxstream.pipeline.banks import Bank, NOISE_KINDS, write_clip_set
from voxstream.pipeline.cpu_augment import augment_crop, build_compose, prepare_cpu_augment

SR = 16000
PRE_DELAY = 150  # samples before the RIR's direct path: far more than the 16-sample tolerance


def speech_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """Harmonics of a random pitch under a syllable-rate envelope, with a little noise."""
    t = np.arange(n) / SR
    f0 = rng.uniform(90, 220)
    voiced = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6)) / k for k in range(1, 12))
    envelope = np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 6)) ** 2
    return 0.1 * voiced * envelope + 0.002 * rng.normal(size=n)


def room_rir(rng: np.random.Generator, rt60: float) -> np.ndarray:
    n = int(0.6 * SR)
    tail = rng.normal(size=n) * np.exp(-6.9 * np.arange(n) / (rt60 * SR)) * 0.2
    tail[0] = 0.9  # the direct path
    return np.concatenate([np.zeros(PRE_DELAY), tail])


def noise_clips(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    t = np.arange(3 * SR) / SR
    clips = [("noise", rng.normal(0, rng.uniform(0.02, 0.2), rng.integers(SR, 4 * SR))) for _ in range(4)]
    clips += [("music", 0.1 * np.sin(2 * np.pi * f * t) + 0.05 * np.sin(3 * np.pi * f * t)) for f in (220, 330, 440)]
    clips += [("speech", speech_like(rng, 2 * SR)) for _ in range(8)]
    return clips


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("banks")
    rng = np.random.default_rng(0)
    write_clip_set(str(root / "musan"), "musan", noise_clips(rng))
    write_clip_set(str(root / "rirs"), "rirs", [("rir", room_rir(rng, rt)) for rt in (0.2, 0.4, 0.6)])
    return {"noise": str(root / "musan"), "rir": str(root / "rirs"), "root": root}


def augmenter(sets, seed=0, **overrides) -> Augmenter:
    cfg = AugmentConfig(noise=sets["noise"], rir=sets["rir"], segment_seconds=2.0, **overrides)
    return Augmenter.from_config(cfg, "cpu", seed)


def batch(n: int, length: int = SR, seed: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor(np.stack([speech_like(rng, length) for _ in range(n)]), dtype=torch.float32)


def snr_db(signal: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(power(signal) / power(noise)).squeeze(-1)


NOISE_ONLY = dict(p_none=0.0, p_reverb=0.0, p_noise=1.0, p_both=0.0)
REVERB_ONLY = dict(p_none=0.0, p_reverb=1.0, p_noise=0.0, p_both=0.0)
BOTH = dict(p_none=0.0, p_reverb=0.0, p_noise=0.0, p_both=1.0)


def test_measured_snr_matches_the_draw_per_category(sets):
    aug = augmenter(sets, **NOISE_ONLY)
    x = batch(48)
    draws = aug.draw(*x.shape)
    y = aug.apply(x, draws)
    assert (draws.mode == NOISE).all()
    assert (snr_db(x, y - x) - draws.snr_db).abs().max() < 0.5
    for c, (low, high) in enumerate(([0, 15], [5, 15], [13, 20])):
        drawn = draws.snr_db[draws.category == c]
        assert len(drawn) > 0, CATEGORIES[c]
        assert ((drawn >= low) & (drawn <= high)).all(), CATEGORIES[c]
    clips = (draws.rows >= 0).sum(1)
    babble = draws.category == CATEGORIES.index("babble")
    assert ((clips[babble] >= 3) & (clips[babble] <= 7)).all() and (clips[~babble] == 1).all()
    assert (aug.noise.kinds[draws.rows[babble][draws.rows[babble] >= 0]] == NOISE_KINDS.index("speech")).all()


def test_noise_snr_is_relative_to_the_reverberated_signal(sets):
    aug = augmenter(sets, **BOTH)
    x = batch(8)
    draws = aug.draw(*x.shape)
    wet = aug.apply(x, dataclasses.replace(draws, mode=torch.full_like(draws.mode, REVERB)))
    y = aug.apply(x, draws)
    assert (snr_db(wet, y - wet) - draws.snr_db).abs().max() < 0.5


def test_mixing_agrees_with_audiomentations(sets, tmp_path):
    rng = np.random.default_rng(5)
    clip = (rng.normal(0, 0.05, SR) * 32768).astype(np.int16)
    url = str(tmp_path / "one-noise")
    write_clip_set(url, "musan", [("noise", clip), ("music", rng.normal(0, 0.1, SR))])
    x = batch(4)
    for snr in (0.0, 7.5, 15.0):
        cfg = AugmentConfig(noise=url, segment_seconds=1.0, p_categories=[1.0, 0.0, 0.0],
                            snr_noise=[snr, snr], **NOISE_ONLY)
        ours = Augmenter.from_config(cfg, "cpu", seed=0)(x)
        theirs = build_compose(prepare_cpu_augment([{"name": "AddBackgroundNoise", "sounds_path": url, "kind": "noise",
                                                     "min_snr_db": snr, "max_snr_db": snr, "p": 1.0}],
                                                   str(tmp_path / "cache")))
        reference = torch.tensor(np.stack([augment_crop(theirs, row) for row in x.numpy()]))
        assert (snr_db(x, ours - x) - snr).abs().max() < 0.5
        assert (snr_db(x, ours - x) - snr_db(x, reference - x)).abs().max() < 0.05
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def lag_of_peak(dry: np.ndarray, wet: np.ndarray) -> int:
    n = 2 * len(dry)
    xcorr = np.fft.irfft(np.fft.rfft(wet, n) * np.conj(np.fft.rfft(dry, n)), n)
    lag = int(np.argmax(np.abs(xcorr)))
    return lag if lag < len(dry) else lag - n


def noise_bursts(n: int, length: int = SR) -> torch.Tensor:
    """Broadband, aperiodic input: its cross-correlation with the reverberated copy follows the RIR
    (a voiced signal would also peak at multiples of its pitch period)."""
    rng = np.random.default_rng(7)
    envelope = np.sin(np.pi * 3 * np.arange(length) / length) ** 2
    return torch.tensor(rng.normal(0, 0.1, (n, length)) * envelope, dtype=torch.float32)


def test_reverb_is_aligned_and_keeps_energy(sets):
    aug = augmenter(sets, **REVERB_ONLY)
    x = noise_bursts(6)
    draws = aug.draw(*x.shape)
    y = aug.apply(x, draws)
    assert len(set(draws.rir.tolist())) > 1
    assert not torch.allclose(y, x, atol=1e-3)
    for dry, wet in zip(x.numpy(), y.numpy()):
        assert abs(lag_of_peak(dry, wet)) <= 16
    torch.testing.assert_close(power(y), power(x), rtol=1e-4, atol=0)


def test_cpu_option_reverb_from_shards_is_aligned(sets, tmp_path):
    specs = prepare_cpu_augment([{"name": "ApplyImpulseResponse", "ir_path": sets["rir"], "p": 1.0}],
                                str(tmp_path / "cache"))
    dry = noise_bursts(1).numpy()[0]
    assert abs(lag_of_peak(dry, augment_crop(build_compose(specs), dry))) <= 16


def test_draws_differ_per_sample_and_repeat_for_a_seed(sets):
    x = batch(32)
    first, second = augmenter(sets, seed=3), augmenter(sets, seed=3)
    a, b = first.draw(*x.shape), second.draw(*x.shape)
    for name in ("mode", "rir", "category", "rows", "offsets"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.snr_db.nan_to_num(-1), b.snr_db.nan_to_num(-1))
    assert len(a.mode.unique()) == 4
    assert len(a.snr_db[~a.snr_db.isnan()].unique()) == int((~a.snr_db.isnan()).sum()) > 1
    assert torch.equal(first(x), second(x))
    other = augmenter(sets, seed=4).draw(*x.shape)
    assert not torch.equal(a.mode, other.mode)


def test_state_dict_resumes_the_same_draws(sets):
    x = batch(8)
    aug = augmenter(sets, seed=9)
    aug(x)
    state = aug.state_dict()
    expected = aug(x)
    resumed = augmenter(sets, seed=123)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(x), expected)


def test_bank_stays_within_budget_and_refreshes(tmp_path):
    rng = np.random.default_rng(2)
    url = str(tmp_path / "big")
    write_clip_set(url, "musan", [("noise", rng.normal(0, 0.1, 3 * SR)) for _ in range(20)])  # ~1.9 MB int16
    budget = 400_000
    bank = Bank.from_shards(url, NOISE_KINDS, SR, budget, "cpu", seed=0)
    assert 0 < bank.nbytes <= budget and not bank.complete
    before = bank.data.clone()
    assert bank.refresh(4) == 4
    assert bank.nbytes == before.numel() * 2 and (bank.data != before).any(1).sum() == 4
    changed = bank.data.clone()
    bank.start_refresh(interval=0.01, fraction=0.5)
    deadline = time.monotonic() + 10
    while torch.equal(bank.data, changed) and time.monotonic() < deadline:
        time.sleep(0.01)
    bank.close()
    assert not torch.equal(bank.data, changed) and bank.nbytes <= budget


def test_whole_set_within_budget_is_complete(sets):
    aug = augmenter(sets)
    assert aug.noise.complete and aug.rirs.complete
    assert aug.rirs.data.shape[1] == int(0.6 * SR)  # aligned on the peak: pre-delay gone, padding trimmed


def test_silent_input_and_silent_noise_stay_finite(sets, tmp_path):
    aug = augmenter(sets, **BOTH)
    silent = torch.zeros(4, SR)
    assert torch.equal(aug(silent), silent)
    url = str(tmp_path / "silent")
    write_clip_set(url, "musan", [("noise", np.zeros(SR)), ("music", np.zeros(SR // 2))])
    write_clip_set(str(tmp_path / "rirs"), "rirs", [("rir", np.zeros(SR // 4)), ("rir", room_rir(np.random.default_rng(0), 0.3))])
    quiet = Augmenter.from_config(AugmentConfig(noise=url, rir=str(tmp_path / "rirs"), segment_seconds=1.0, **NOISE_ONLY), "cpu")
    assert len(quiet.rirs.kinds) == 1  # the silent RIR was dropped
    x = batch(4)
    assert torch.equal(quiet(x), x)
    assert torch.isfinite(Augmenter.from_config(dataclasses.replace(quiet.cfg, **BOTH), "cpu")(silent)).all()


def test_bad_input_is_named(sets, tmp_path):
    url = str(tmp_path / "speech-only")
    write_clip_set(url, "vox", [("speech", np.zeros(10))])
    with pytest.raises(ValueError, match="no samples of kinds"):
        Bank.from_shards(url, ("rir",), SR, 1 << 20, "cpu")
    with pytest.raises(ValueError, match="longer than the noise bank rows"):
        augmenter(sets)(torch.zeros(2, 3 * SR))
    assert not Augmenter.from_config(AugmentConfig(), "cpu").enabled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(sets):
    x = batch(16)
    cpu = augmenter(sets, seed=5)(x)
    cfg = AugmentConfig(noise=sets["noise"], rir=sets["rir"], segment_seconds=2.0)
    cuda = Augmenter.from_config(cfg, "cuda", seed=5)(x.cuda())
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=1e-3)


def test_channel_shapes_the_spectrum_as_drawn():
    """A sample's channel attenuates each frequency by its drawn response (relative to 1 kHz)."""
    from voxstream.pipeline.augment import EQ_BUMPS, channel_response
    aug = Augmenter(AugmentConfig(p_channel=1.0), None, None, seed=3)
    t = torch.arange(2 * SR) / SR
    tones = (1000.0, 250.0, 3000.0, 6500.0)
    wave = sum(torch.sin(2 * torch.pi * f * t) for f in tones).repeat(4, 1)
    draws = aug.draw(*wave.shape)
    assert not draws.channel.isnan().any() and draws.channel.shape == (4, 3 + 3 * EQ_BUMPS)
    out = aug.apply(wave, draws)
    spectrum = torch.fft.rfft(out * torch.hann_window(out.shape[1], periodic=False)).abs()
    bins = [round(f * out.shape[1] / SR) for f in tones]
    measured = 20 * torch.log10(spectrum[:, bins] / spectrum[:, bins[:1]])
    expected = channel_response(draws.channel, torch.tensor(tones))
    expected = 20 * torch.log10(expected / expected[:, :1])
    visible = expected > -40   # deeper cuts sink under the window's leakage
    torch.testing.assert_close(measured[visible], expected[visible], atol=0.5, rtol=0)
    assert torch.allclose(power(out), power(wave), rtol=1e-4)


def test_channel_draws_follow_p_channel_and_keep_silence():
    aug = Augmenter(AugmentConfig(p_channel=0.5), None, None, seed=0)
    assert aug.enabled
    drawn = ~aug.draw(1000, 100).channel[:, 0].isnan()
    assert 400 < drawn.sum() < 600
    silent = aug(torch.zeros(8, SR))
    assert torch.equal(silent, torch.zeros(8, SR))
    off = Augmenter(AugmentConfig(), None, None, seed=0)
    assert not off.enabled and off.draw(10, 100).channel.isnan().all()
