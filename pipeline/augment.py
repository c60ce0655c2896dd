"""Augmentation on the training device: per-sample reverb and MUSAN noise, vectorised over the batch.

Each sample of each call independently gets none / reverb / noise / both. Noise is one of the Kaldi
VoxCeleb categories with its SNR range: noise 0-15 dB, music 5-15 dB, babble 13-20 dB (3-7 speech
clips summed, the sum mixed at the drawn SNR). SNR is the ratio of the powers (mean squares) of the
signal the noise is added to (reverberated, if reverb is drawn too) and of the added noise, the
definition audiomentations' AddBackgroundNoise uses. Reverb convolves with a bank RIR (aligned on
its direct-path peak, unit energy) by FFT and restores the input's energy. An optional channel
(p_channel) then colours everything like a random microphone: band limits, tilt and EQ bumps,
so that an encoder trained on one recording session per positive pair does not learn the session.

The per-sample draws (a few numbers per sample) are made on the host with a seeded CPU generator:
their shapes are then known without waiting for the device (no sync per step), and a seed gives
the same draws on CPU and CUDA. The heavy work (window gathers, FFTs, mixing) is batched tensor
code, the same on both devices, with no Python loop over samples.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from voxstream.pipeline.banks import KINDS, NOISE_KINDS, Bank
from voxstream.shards.format import SAMPLE_RATE
from voxstream.shards.storage import Retry

CATEGORIES = ("noise", "music", "babble")
CATEGORY_KIND = torch.tensor([KINDS.index(k) for k in ("noise", "music", "speech")])  # babble is speech
REVERB, NOISE = 1, 2  # mode bits: 0 none, 1 reverb, 2 noise, 3 both
EPS = 1e-10
EQ_BUMPS = 3


@dataclass
class AugmentConfig:
    noise: str = ""                # MUSAN-format shard set URL ("kind": noise|music|speech); "" = no noise
    rir: str = ""                  # RIR shard set URL ("kind": rir); "" = no reverb
    p_none: float = 0.2            # per-sample mode weights (normalised; a missing bank moves its
    p_reverb: float = 0.2          # share to the mode without it)
    p_noise: float = 0.3
    p_both: float = 0.3
    p_categories: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # noise, music, babble
    snr_noise: list[float] = field(default_factory=lambda: [0.0, 15.0])   # Kaldi VoxCeleb ranges, dB
    snr_music: list[float] = field(default_factory=lambda: [5.0, 15.0])
    snr_babble: list[float] = field(default_factory=lambda: [13.0, 20.0])
    babble_speakers: list[int] = field(default_factory=lambda: [3, 7])
    segment_seconds: float = 6.0   # noise bank row length: the longest crop that can get noise
    rir_seconds: float = 1.0       # RIRs are cut to this after their direct-path peak
    noise_budget_mb: float = 1024  # device memory for the noise bank (int16 samples); default ~1 GB
    rir_budget_mb: float = 256     # and for the RIR bank
    refresh_interval: float = 30.0  # seconds between bank refreshes when a set exceeds its budget (0: never)
    refresh_fraction: float = 0.05  # share of the rows replaced at each refresh
    p_channel: float = 0.0          # probability of a random microphone/channel response (band limits, EQ)
    channel_low_cut: list[float] = field(default_factory=lambda: [40.0, 300.0])     # Hz, log-uniform
    channel_high_cut: list[float] = field(default_factory=lambda: [3400.0, 8000.0])  # Hz, log-uniform
    channel_eq_db: float = 6.0      # std of each EQ bump's gain, dB
    channel_tilt_db: float = 2.0    # std of the spectral tilt, dB per octave around 1 kHz
    cpu: list[dict] = field(default_factory=list)  # audiomentations transforms on every crop in the loader (cpu_augment.py)
    retry_attempts: int = Retry.attempts  # tries per bank shard read before the rest of the shard is skipped
    retry_backoff: float = Retry.backoff  # s before the first retry, doubling; the defaults outwait a 1-min S3 restart
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.retry_attempts < 1 or self.retry_backoff < 0:
            raise ValueError("augment.retry_attempts must be >= 1 and augment.retry_backoff >= 0")


@dataclass
class Draws:
    """The per-sample choices of one call (host tensors), for checks and logs."""
    mode: torch.Tensor      # [B] bits: REVERB | NOISE
    rir: torch.Tensor       # [B] RIR bank row, -1 without reverb
    category: torch.Tensor  # [B] index into CATEGORIES, -1 without noise
    snr_db: torch.Tensor    # [B] drawn SNR, nan without noise
    rows: torch.Tensor      # [B, max clips] noise bank rows summed into the noise, -1 where unused
    offsets: torch.Tensor   # [B, max clips] where each clip's window starts in its row
    channel: torch.Tensor   # [B, 3 + 3 * EQ_BUMPS] channel parameters (see channel_response), nan without


@functools.lru_cache(maxsize=None)
def fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: FFTs are fast on these sizes and slow on large prime factors."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def power(x: torch.Tensor) -> torch.Tensor:
    return x.square().mean(-1, keepdim=True)


def keep_energy(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`out` scaled to the power of `like`, row by row; a silent row stays silent."""
    out_power = power(out)
    return out * torch.where(out_power > EPS, power(like) / out_power.clamp_min(EPS), 0.0).sqrt()


def reverberate(wave: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """Each row of `wave` [n, T] convolved with its RIR [n, L] (peak first), truncated to T, energy kept."""
    rir = rir / rir.norm(dim=-1, keepdim=True).clamp_min(EPS)
    size = fft_size(wave.shape[-1] + rir.shape[-1] - 1)  # long enough that nothing wraps into [0, T)
    spectrum = torch.fft.rfft(wave, size) * torch.fft.rfft(rir, size)
    return keep_energy(torch.fft.irfft(spectrum, size)[..., :wave.shape[-1]], wave)


def mix(wave: torch.Tensor, noise: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
    """wave + noise scaled to power(wave) / 10^(snr/10); silent noise or a silent wave adds nothing."""
    noise_power = power(noise)
    target = power(wave) / 10 ** (snr_db.unsqueeze(-1) / 10)
    gain = torch.where(noise_power > EPS, target / noise_power.clamp_min(EPS), 0.0).sqrt()
    return wave + gain * noise


def channel_response(params: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Magnitude responses [n, F] at `freqs` for channel parameters [n, 3 + 3 * bumps]: smooth
    high-pass and low-pass corners, a spectral tilt and Gaussian EQ bumps on a log-frequency axis."""
    f = freqs.clamp_min(1.0)
    low, high, tilt = params[:, :1], params[:, 1:2], params[:, 2:3]
    centre, gain_db, width = params[:, 3:].unflatten(1, (-1, 3)).unbind(-1)
    corners = torch.rsqrt(1 + (low / f) ** 4) * torch.rsqrt(1 + (f / high) ** 8)
    octaves = torch.log2(f / centre.unsqueeze(-1)) / (width.unsqueeze(-1) / 2)
    db = tilt * torch.log2(f / 1000.0) + (gain_db.unsqueeze(-1) * torch.exp(-0.5 * octaves**2)).sum(1)
    return corners * 10 ** (db / 20)


def equalize(wave: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Each row of `wave` [n, T] through its channel (zero phase, by FFT), energy kept."""
    size = fft_size(wave.shape[-1])
    freqs = torch.fft.rfftfreq(size, 1 / SAMPLE_RATE, device=wave.device)
    out = torch.fft.irfft(torch.fft.rfft(wave, size) * channel_response(params, freqs), size)
    return keep_energy(out[..., :wave.shape[-1]], wave)


class Augmenter:
    """Batched noise + reverb on the device that holds the banks; `augmenter(wave [B, T]) -> [B, T]`."""

    def __init__(self, cfg: AugmentConfig, noise: Bank | None, rirs: Bank | None, seed: int = 0):
        self.cfg, self.noise, self.rirs = cfg, noise, rirs
        self.generator = torch.Generator().manual_seed(seed)
        none, reverb, noisy, both = cfg.p_none, cfg.p_reverb, cfg.p_noise, cfg.p_both
        if rirs is None:
            none, reverb, noisy, both = none + reverb, 0.0, noisy + both, 0.0
        if noise is None:
            none, reverb, noisy, both = none + noisy, reverb + both, 0.0, 0.0
        self.mode_weights = torch.tensor([none, reverb, noisy, both], dtype=torch.float64)
        if min(cfg.p_none, cfg.p_reverb, cfg.p_noise, cfg.p_both) < 0 or not self.mode_weights.sum() > 0:
            raise ValueError("augment.p_none/p_reverb/p_noise/p_both: weights must be >= 0, not all 0")
        self.snr_ranges = torch.tensor([cfg.snr_noise, cfg.snr_music, cfg.snr_babble], dtype=torch.float32)
        self.max_clips = max(1, cfg.babble_speakers[1])

    @classmethod
    def from_config(cls, cfg: AugmentConfig, device: torch.device | str, seed: int = 0) -> "Augmenter":
        """Fill the banks of `cfg` on `device` (a background refresh for sets above their budget).
        Give every rank its own seed (e.g. seed + rank) so that ranks draw differently."""
        opts, retry = cfg.storage_options, Retry(cfg.retry_attempts, cfg.retry_backoff)
        noise = rirs = None
        if cfg.noise:
            noise = Bank.from_shards(cfg.noise, NOISE_KINDS, round(cfg.segment_seconds * SAMPLE_RATE),
                                     int(cfg.noise_budget_mb * 2**20), device, seed, opts, retry)
            noise.start_refresh(cfg.refresh_interval, cfg.refresh_fraction)
        if cfg.rir:
            rirs = Bank.from_shards(cfg.rir, ("rir",), round(cfg.rir_seconds * SAMPLE_RATE),
                                    int(cfg.rir_budget_mb * 2**20), device, seed + 1, opts, retry)
            rirs.start_refresh(cfg.refresh_interval, cfg.refresh_fraction)
        return cls(cfg, noise, rirs, seed)

    @property
    def enabled(self) -> bool:
        return self.noise is not None or self.rirs is not None or self.cfg.p_channel > 0

    def draw(self, batch: int, length: int) -> Draws:
        """Independent choices for `batch` samples of `length` samples each."""
        g = self.generator
        mode = torch.multinomial(self.mode_weights, batch, replacement=True, generator=g)
        reverb, noisy = (mode & REVERB) > 0, (mode & NOISE) > 0
        rir = torch.randint(len(self.rirs.kinds) if self.rirs else 1, (batch,), generator=g)
        rir = rir.where(reverb, -1)
        category = torch.full((batch,), -1)
        snr = torch.full((batch,), float("nan"))
        rows = torch.full((batch, self.max_clips), -1)
        offsets = torch.zeros((batch, self.max_clips), dtype=torch.long)
        if self.noise is not None:
            category, snr, rows, offsets = self._draw_noise(batch, length, noisy)
        return Draws(mode, rir, category, snr, rows, offsets, self._draw_channel(batch))

    def _draw_channel(self, batch: int) -> torch.Tensor:
        """Per sample: low cut, high cut (Hz), tilt (dB/octave), then (centre Hz, gain dB, width octaves) per bump."""
        g, cfg = self.generator, self.cfg

        def log_uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
            return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(*shape, generator=g))

        params = torch.cat([log_uniform(*cfg.channel_low_cut, batch, 1), log_uniform(*cfg.channel_high_cut, batch, 1),
                            cfg.channel_tilt_db * torch.randn(batch, 1, generator=g),
                            torch.stack([log_uniform(150.0, 6000.0, batch, EQ_BUMPS),
                                         cfg.channel_eq_db * torch.randn(batch, EQ_BUMPS, generator=g),
                                         0.3 + 1.2 * torch.rand(batch, EQ_BUMPS, generator=g)], -1).flatten(1)], 1)
        chosen = torch.rand(batch, generator=g) < cfg.p_channel
        return params.where(chosen.unsqueeze(1), float("nan"))

    def _draw_noise(self, batch: int, length: int, noisy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        g, row_length = self.generator, self.noise.data.shape[1]
        if length > row_length:
            raise ValueError(f"crop of {length} samples is longer than the noise bank rows "
                             f"({row_length}): raise augment.segment_seconds")
        # Rows grouped by kind: a kind's rows are order[start : start + count].
        counts = self.noise.counts()
        order = torch.argsort(self.noise.kinds, stable=True)
        starts = counts.cumsum(0) - counts
        weights = torch.tensor(self.cfg.p_categories, dtype=torch.float64) * (counts[CATEGORY_KIND] > 0)
        if not weights.sum() > 0:
            raise ValueError(f"noise bank {self.cfg.noise}: no rows for the categories weighted by "
                             f"augment.p_categories {self.cfg.p_categories} (noise, music, babble)")
        category = torch.multinomial(weights, batch, replacement=True, generator=g)
        low, high = self.snr_ranges[category].unbind(-1)
        snr = low + (high - low) * torch.rand(batch, generator=g)
        lo, hi = self.cfg.babble_speakers
        clips = torch.randint(lo, hi + 1, (batch,), generator=g).where(category == CATEGORIES.index("babble"), 1)
        kind = CATEGORY_KIND[category].unsqueeze(1)
        pick = (torch.rand(batch, self.max_clips, generator=g) * counts[kind]).long()
        rows = order[(starts[kind] + pick).clamp_max(len(order) - 1)]  # clamp: kinds never drawn may be empty
        offsets = torch.randint(row_length - length + 1, (batch, self.max_clips), generator=g)
        used = (torch.arange(self.max_clips) < clips.unsqueeze(1)) & noisy.unsqueeze(1)
        return (category.where(noisy, -1), snr.where(noisy, float("nan")),
                rows.where(used, -1), offsets.where(used, 0))

    def apply(self, wave: torch.Tensor, draws: Draws) -> torch.Tensor:
        """`wave` [B, T] float on the banks' device, augmented as `draws` says."""
        out = wave.float()
        reverb = (draws.mode & REVERB).nonzero().squeeze(1)
        if reverb.numel():
            where = self._to(out, reverb)
            rir = self.rirs.data.index_select(0, self._to(out, draws.rir[reverb])).float()
            out = out.index_copy(0, where, reverberate(out.index_select(0, where), rir))
        noisy = (draws.mode & NOISE).nonzero().squeeze(1)
        if noisy.numel():
            where = self._to(out, noisy)
            noise = self._noise(out, draws.rows[noisy], draws.offsets[noisy])
            mixed = mix(out.index_select(0, where), noise, self._to(out, draws.snr_db[noisy]))
            out = out.index_copy(0, where, mixed)
        channel = (~draws.channel[:, 0].isnan()).nonzero().squeeze(1)
        if channel.numel():  # the microphone comes last: it colours speech, room and noise alike
            where = self._to(out, channel)
            out = out.index_copy(0, where, equalize(out.index_select(0, where), self._to(out, draws.channel[channel])))
        return out

    def _noise(self, like: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[n, T] noise: the sum of each sample's clip windows (slot 0 always used; more for babble)."""
        length, row_length = like.shape[-1], self.noise.data.shape[1]
        windows = self.noise.data.view(-1).unfold(0, length, 1)  # every T-long window of the bank, no copy
        starts = rows * row_length + offsets
        noise = windows.index_select(0, self._to(like, starts[:, 0])).float()
        for slot in range(1, rows.shape[1]):  # a loop over babble speakers, not over samples
            owners = (rows[:, slot] >= 0).nonzero().squeeze(1)
            if owners.numel():
                clip = windows.index_select(0, self._to(like, starts[owners, slot])).float()
                noise.index_add_(0, self._to(like, owners), clip)
        return noise  # its scale does not matter: mix() sets the level

    @staticmethod
    def _to(like: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        # From pageable memory, non_blocking copies without waiting for the device's queue.
        return host.to(like.device, non_blocking=True)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return wave
        locks = [b.lock for b in (self.noise, self.rirs) if b is not None]
        for lock in locks:  # rows drawn must still be those rows when the gathers are enqueued
            lock.acquire()
        try:
            return self.apply(wave, self.draw(*wave.shape))
        finally:
            for lock in locks:
                lock.release()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def close(self) -> None:
        """Stop the banks' refresh threads."""
        for bank in (self.noise, self.rirs):
            if bank is not None:
                bank.close()
