"""The SSL methods by recipe name (a leaf: recipe.method_config reads a `method:` section with it)."""
from __future__ import annotations

from torch import nn

from voxstream.model.encoders import EncoderConfig, build_encoder
from voxstream.model.methods.aam import AAM
from voxstream.model.methods.barlow import BarlowTwins
from voxstream.model.methods.base import MethodConfig, SSLMethod
from voxstream.model.methods.dino import DINO
from voxstream.model.methods.moco import MoCo
from voxstream.model.methods.simclr import SimCLR
from voxstream.model.methods.swav import SwAV
from voxstream.model.methods.vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {
    "simclr": SimCLR, "moco": MoCo, "dino": DINO, "vicreg": VICReg, "barlow": BarlowTwins, "swav": SwAV, "aam": AAM}


def build_method(enc_cfg: EncoderConfig, method_cfg: MethodConfig, encoder: nn.Module | None = None) -> SSLMethod:
    """A fresh method around `encoder`, or a fresh one (initial weights are the global torch seed's draw).
    Momentum copies (MoCo, DINO) start as copies of the encoder given."""
    return METHODS[method_cfg.name](encoder or build_encoder(enc_cfg), method_cfg, enc_cfg.embed_dim)
