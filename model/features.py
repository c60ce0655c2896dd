"""Log-mel filterbank front-end: 80 bins, 25 ms window, 10 ms hop, per-utterance mean normalisation."""
from __future__ import annotations

import torch
import torchaudio
from torch import nn

SAMPLE_RATE = 16000


class Fbank(nn.Module):
    """float waveform [B, T] at 16 kHz -> log-mel features [B, n_mels, frames], always in fp32.

    Under bf16 autocast the STFT power and its log lose the precision small energies need, so
    autocast is switched off here; the encoder after it runs in whatever precision the caller set.
    """

    def __init__(self, n_mels: int = 80, floor: float = 1e-6):
        super().__init__()
        self.floor = floor
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=512, win_length=400, hop_length=160,
            f_min=20.0, f_max=7600.0, window_fn=torch.hamming_window, n_mels=n_mels)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(wave.device.type, enabled=False):
            x = torch.log(self.mel(wave.float()) + self.floor)
            # Mean normalisation per utterance and bin (CMN): removes the channel's spectral tilt.
            return x - x.mean(dim=-1, keepdim=True)
