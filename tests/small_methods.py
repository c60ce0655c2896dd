"""Every method at test size (the published recipes shrunk), and views of synthetic voices for it."""
from __future__ import annotations

import torch

from voices import utterances
from voxstream.model.encoders import EncoderConfig
from voxstream.model.methods import build_method
from voxstream.model.recipe import method_config

ENCODER = EncoderConfig("ecapa", channels=32, embed_dim=32)
SMALL = {
    "simclr": {"projector_hidden_dim": 64, "projector_output_dim": 32},
    "moco": {"queue_size": 96, "momentum": 0.9, "projector_hidden_dim": 64, "projector_output_dim": 32},
    "dino": {"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32},
    "vicreg": {"projector_hidden_dim": 64, "projector_output_dim": 64},
    "barlow": {"projector_hidden_dim": 64, "projector_output_dim": 64},
    "swav": {"projector_hidden_dim": 64, "projector_output_dim": 32, "prototypes": 16, "queue_size": 32,
             "queue_start_fraction": 1 / 3, "freeze_prototypes_fraction": 1 / 6},
}
METHODS = sorted(SMALL)


def make(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_method(ENCODER, method_config({"name": name, **SMALL[name], **overrides}))


def views_for(name: str, voices: torch.Tensor, g: torch.Generator, seconds: float = 0.5) -> list[torch.Tensor]:
    """The views each method is built for: a pair; DINO adds two local crops of half the length,
    SwAV a third crop (multi-crop: predicted, not assigned)."""
    durations = [seconds] * (3 if name == "swav" else 2) + ([seconds / 2] * 2 if name == "dino" else [])
    return [utterances(voices, d, g) for d in durations]
