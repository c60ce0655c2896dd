"""Synthetic speakers for the tests: a voice is a pitch and a harmonic envelope; each utterance of it
redraws the phases, the syllable gating, the gain and the noise, so two utterances of one voice
share the voice and nothing else."""
from __future__ import annotations

import math

import torch

SR = 16000
SYLLABLE = 1280  # 80 ms


def voices(n: int, seed: int) -> torch.Tensor:
    """[n, 13]: per voice a pitch (90-290 Hz) and 12 harmonic amplitudes, fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    f0 = 90 + 200 * torch.rand(n, 1, generator=g)
    envelope = torch.rand(n, 12, generator=g) ** 2
    return torch.cat([f0, envelope], dim=1)


def utterances(voices: torch.Tensor, seconds: float, g: torch.Generator) -> torch.Tensor:
    """[n, seconds * SR]: one utterance per voice, peak at most about 1. Harmonics with random
    phases, switched on and off in 80 ms "syllables" (the front-end's mean normalisation would
    erase a stationary tone), with random gain and background noise."""
    n, t = len(voices), torch.arange(int(seconds * SR)) / SR
    f0, env = voices[:, :1], voices[:, 1:]
    h = torch.arange(1, env.shape[1] + 1)
    phase = 2 * math.pi * torch.rand(n, len(h), 1, generator=g)
    wave = (env.unsqueeze(-1) * torch.sin(2 * math.pi * (f0 * h).unsqueeze(-1) * t + phase)).sum(1)
    syllables = (torch.rand(n, len(t) // SYLLABLE + 1, generator=g) < 0.6).float()
    wave = wave / wave.abs().amax(dim=1, keepdim=True) * syllables.repeat_interleave(SYLLABLE, dim=1)[:, :len(t)]
    gain = 0.2 + 0.8 * torch.rand(n, 1, generator=g)
    return gain * (wave + 0.03 * torch.randn(wave.shape, generator=g))
