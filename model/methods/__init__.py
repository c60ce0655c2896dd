"""The SSL methods by recipe name, and how a recipe's `method:` section becomes one."""
from __future__ import annotations

from voxstream.model.encoders import EncoderConfig, build_encoder
from voxstream.model.methods.barlow import BarlowTwins
from voxstream.model.methods.base import MethodConfig, SSLMethod
from voxstream.model.methods.dino import DINO
from voxstream.model.methods.moco import MoCo
from voxstream.model.methods.simclr import SimCLR
from voxstream.model.methods.swav import SwAV
from voxstream.model.methods.vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {
    "simclr": SimCLR, "moco": MoCo, "dino": DINO, "vicreg": VICReg, "barlow": BarlowTwins, "swav": SwAV}


def method_config(d: dict) -> MethodConfig:
    """The `method:` section (with its `name`) as that method's Config; unknown keys and wrong types
    are errors naming the key."""
    name = d.get("name")
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not a method; choose one of {sorted(METHODS)}")
    from voxstream.model.recipe import build_section  # the one key/type check of every recipe section (recipe imports us)
    return build_section(METHODS[name].Config, d, "method")


def build_method(enc_cfg: EncoderConfig, method_cfg: MethodConfig) -> SSLMethod:
    """A fresh method around a fresh encoder."""
    return METHODS[method_cfg.name](build_encoder(enc_cfg), method_cfg, enc_cfg.embed_dim)
