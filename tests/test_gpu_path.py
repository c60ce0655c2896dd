"""The CUDA path's code, run on CPU: a bf16 step of every method, the compiled encoder against eager,
and no host-device sync in a training step."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from runs import write_banks
from small_methods import ENCODER, METHODS, SMALL, views_for
from voices import voices
from voxstream.model.encoders import compile_encoders
from voxstream.model.methods import build_method
from voxstream.model.recipe import OptimConfig, RecipeError, TrainConfig, method_config, recipe_from_dict
from voxstream.model.train import autocast_for, build_optimizer, train_step
from voxstream.pipeline.augment import AugmentConfig, Augmenter

EVERY_METHOD = [*METHODS, "aam"]
GROUPS = torch.tensor([0, 1, 1, 2, 3, 0, 4, 5])  # AAM: the classes
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    return write_banks(str(tmp_path_factory.mktemp("banks")))


def make(name: str, seed: int = 0):
    """A tiny method (AAM over GROUPS' classes) and its optimizer, built as the trainer builds them."""
    torch.manual_seed(seed)
    method = build_method(ENCODER, method_config({"name": name, **SMALL.get(name, {"classes": 6})}))
    return method, build_optimizer(method, OptimConfig(name="adamw", lr=1e-3, grad_clip=5.0))


def views(name: str, seed: int = 0) -> list[torch.Tensor]:
    return views_for(name, voices(len(GROUPS), seed), torch.Generator().manual_seed(seed))


def augmenter(banks, seed: int = 0) -> Augmenter:
    noise, rir = banks
    return Augmenter.from_config(AugmentConfig(noise=noise, rir=rir, segment_seconds=1.0, rir_seconds=0.25,
                                               p_channel=0.5), CPU, seed)


# --- bf16 ---------------------------------------------------------------------------------------

def bf16_on_cpu(**train) -> bool:
    with autocast_for(CPU, recipe_from_dict({"method": {"name": "simclr"}, "train": train}).train):
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_bf16_on_cpu_is_an_opt_in_beside_bf16():
    assert not bf16_on_cpu() and not bf16_on_cpu(bf16=True)  # the recipes' bf16: true keeps CPU in fp32
    assert bf16_on_cpu(bf16_cpu=True)
    with pytest.raises(RecipeError, match=r"^train.bf16_cpu: true needs train.bf16: true"):
        bf16_on_cpu(bf16=False, bf16_cpu=True)


@pytest.mark.parametrize("name", EVERY_METHOD)
def test_a_bf16_step_keeps_fbank_and_augmentation_fp32_and_the_loss_near_fp32(name, banks):
    """The same weights, batch and augmentation draws, one step in fp32 and one under the trainer's CPU
    bf16 autocast. bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.4 %) and the encoder's
    layers round their inputs one after the other: the losses differ by up to 0.8 % (Barlow Twins;
    0.04 % for SwAV), and 2 % is allowed.
    """
    dtypes: dict[str, set] = {"fbank": set(), "augmented": set(), "net": set()}
    losses = {}
    for bf16 in (False, True):
        method, optimizer = make(name)
        aug = augmenter(banks)
        method.encoder.features.register_forward_hook(lambda m, i, out: dtypes["fbank"].add(out.dtype) if bf16 else None)
        method.encoder.net.register_forward_hook(lambda m, i, out: dtypes["net"].add(out.dtype) if bf16 else None)
        apply = aug.apply
        aug.apply = lambda wave, draws: (out := apply(wave, draws), bf16 and dtypes["augmented"].add(out.dtype))[0]
        autocast = autocast_for(CPU, TrainConfig(bf16=True, bf16_cpu=bf16))
        loss, stats = train_step(method, optimizer, aug, views(name), GROUPS, autocast, 5.0)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values()), stats
        losses[bf16] = loss.item()
    assert dtypes == {"fbank": {torch.float32}, "augmented": {torch.float32}, "net": {torch.bfloat16}}
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


# --- torch.compile ------------------------------------------------------------------------------

def inductor_missing() -> str | None:
    """Why inductor cannot build CPU kernels here, or None."""
    from torch._inductor import config
    compiler = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    if not any(shutil.which(c) for c in (compiler, "g++", "c++", "clang++") if c):
        return "torch.compile (inductor) needs a C++ compiler on CPU; none on PATH"
    return None


@pytest.mark.slow
def test_the_compiled_encoder_matches_eager():
    """train.compile's path (compile_encoders: every encoder compiled in place) against eager. Inductor
    fuses and reorders fp32 arithmetic, so outputs and gradients match eager to float rounding (1e-4
    relative), not bit for bit. The method heads stay eager: a few matmuls, and the methods' Python-side
    state (queues, pointers, SSPS swaps) would only break the graph. The state_dict keys are unchanged,
    so a checkpoint does not depend on train.compile."""
    if reason := inductor_missing():
        pytest.skip(reason)
    torch.manual_seed(0)
    method = build_method(ENCODER, method_config({"name": "simclr"})).train()
    eager = copy.deepcopy(method.encoder)
    keys = list(method.state_dict())
    compile_encoders(method)
    assert list(method.state_dict()) == keys
    wave = views("simclr")[0]
    results = []
    for network in (eager, method.encoder):  # train mode: batch statistics, the running ones updated each pass
        out = network(wave)
        results.append((out, torch.autograd.grad(out.square().mean(), list(network.parameters()))))
    (eager_out, eager_grad), (compiled_out, compiled_grad) = results
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-5)


# --- host-device syncs --------------------------------------------------------------------------

SIZE_FROM_VALUES = {"nonzero", "masked_select", "unique_dim", "_unique2", "unique_consecutive", "argwhere",
                    "repeat_interleave", "equal", "is_nonzero", "_local_scalar_dense"}
TO_HOST = {"cpu", "numpy", "tolist", "__array__"}


class NoDeviceSync(TorchDispatchMode):
    """Raises where a step on a GPU would make the host wait for the device.

    On CPU every tensor is a host tensor, so the guard tracks the tensors that would be on the device:
    those it is given (weights, buffers, views, groups, the noise and RIR banks), every result of an op
    that takes one (gradients and optimizer state included), and every tensor a step makes with an
    explicit `device=` (`torch.arange(b, device=z.device)`; the string "cpu" names the host). The
    augmenter's draws (a host generator) and AdamW's step counts (`device="cpu"`) stay host tensors, as
    they are on a GPU. A device tensor must not reach
    - `aten._local_scalar_dense`: what `.item()`, `float()`, `int()` and `bool()` (`if t:`) run;
    - an op whose output size depends on values (nonzero, masked_select, unique, a boolean-mask index),
      or `equal`, which returns a Python bool;
    - the host: `.cpu()`, `.numpy()`, `.tolist()`, or `host.copy_(device)`.
    What it cannot see on CPU: `.to("cpu")`, which here is the same call as `.to(device)`. On a GPU,
    `torch.cuda.set_sync_debug_mode("error")` catches the same syncs at the driver.
    """

    def __init__(self, *device: object):
        super().__init__()
        self.on_device = WeakIdKeyDictionary()
        for t in tree_flatten(device)[0]:
            self.mark(t)
        self.calls = _DeviceFactories(self)

    def mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self.on_device[t] = True

    def holds(self, args) -> bool:
        return any(isinstance(t, torch.Tensor) and t in self.on_device for t in tree_flatten(args)[0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self.holds((args, kwargs)):
            if name in SIZE_FROM_VALUES or name.startswith("index") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_flatten(args[1:2])[0]):
                raise AssertionError(f"aten.{name} on a device tensor: a host-device sync on a GPU")
        out = func(*args, **kwargs)
        if self.holds((args, kwargs)):
            for t in tree_flatten(out)[0]:
                self.mark(t)
        return out

    def __enter__(self):
        self.calls.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.calls.__exit__(*exc)


class _DeviceFactories(TorchFunctionMode):
    """NoDeviceSync's Python half: tensors made with `device=` are device tensors; `.cpu()` and friends
    of a device tensor are refused, and so is `host.copy_(device)` (checked here: inside aten, copies into
    buffers made from a tensor's options would look like one)."""

    def __init__(self, guard: NoDeviceSync):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in TO_HOST and self.guard.holds(args[:1]):
            raise AssertionError(f"Tensor.{name} of a device tensor: a host-device sync on a GPU")
        if name == "copy_" and not self.guard.holds(args[:1]) and self.guard.holds(args[1:2]):
            raise AssertionError("copy_ from a device tensor into a host tensor: a host-device sync on a GPU")
        out = func(*args, **kwargs)
        if kwargs.get("device") not in (None, "cpu"):  # "cpu" as a string names the host
            for t in tree_flatten(out)[0]:
                self.guard.mark(t)
        return out


def device_state(method, optimizer, aug: Augmenter, *tensors) -> list:
    """What lives on the device during training; AdamW's step counts stay on the host (not capturable)."""
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    return [*method.parameters(), *method.buffers(), *moments, aug.noise.data, aug.rirs.data, *tensors]


@pytest.mark.parametrize("name", EVERY_METHOD)
def test_a_training_step_never_syncs_host_and_device(name, banks):
    """Two trainer steps (augmentation, forward, backward, clipping, AdamW, after_step, the meter's
    accumulation) under NoDeviceSync; the first fills AdamW's state, the second uses it."""
    from voxstream.model.logs import Meter
    method, optimizer = make(name)
    aug, meter = augmenter(banks), Meter(CPU)
    batches = [views(name, seed) for seed in range(2)]
    autocast = autocast_for(CPU, TrainConfig())
    for step, v in enumerate(batches):
        with NoDeviceSync(device_state(method, optimizer, aug, v, GROUPS)):
            loss, stats = train_step(method, optimizer, aug, v, GROUPS, autocast, 5.0)
            method.after_step(step, len(batches))
            meter.add(loss, stats)
    assert "grad_norm" in stats


@pytest.mark.parametrize("sync", [lambda t: t.item(), lambda t: bool(t > 0), lambda t: t.cpu(),
                                  lambda t: t[t > 0], lambda t: torch.zeros(1).copy_(t)])
def test_the_sync_guard_catches_each_kind_of_sync(sync, banks):
    method, optimizer = make("simclr")
    aug = augmenter(banks)
    step = method.forward

    def forward_then_sync(v, groups=None, positives=None):
        loss, stats = step(v, groups)
        sync(stats["accuracy"].reshape(1))
        return loss, stats
    method.forward = forward_then_sync
    with pytest.raises(AssertionError, match="host-device sync"):
        with NoDeviceSync(device_state(method, optimizer, aug, GROUPS)):
            train_step(method, optimizer, aug, views("simclr"), GROUPS, autocast_for(CPU, TrainConfig()), 5.0)
