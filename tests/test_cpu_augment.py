"""CPU augmentation (`augment.cpu`) in the loader's streams: seeded per item so that batches repeat and
resume, the same through worker processes, applied to the very crops, and torch-free in the workers."""
from __future__ import annotations

import pickle
import random
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from voxstream.pipeline.banks import write_clip_set
from voxstream.pipeline.cpu_augment import default_cache_dir, prepare_cpu_augment
from voxstream.pipeline.loader import make_loader
from ramps import SR, config, make_set


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(shard set URL, a typical chain: random gain, then noise from a shard set, its cache folder)."""
    root = tmp_path_factory.mktemp("cpu-augment")
    make_set(str(root / "shards"), [24, 24, 24])
    rng = np.random.default_rng(0)
    write_clip_set(str(root / "musan"), "musan", [("noise", rng.normal(0, 0.1, SR)) for _ in range(3)]
                   + [("music", 0.1 * np.sin(np.arange(SR) / 10))])
    chain = prepare_cpu_augment([
        {"name": "Gain", "min_gain_db": -6.0, "max_gain_db": -1.0, "p": 1.0},
        {"name": "AddBackgroundNoise", "sounds_path": str(root / "musan"), "min_snr_db": 5.0, "max_snr_db": 15.0,
         "p": 1.0}], str(root / "cache"))
    return str(root / "shards"), chain, root / "cache"


def batches(url: str, chain: list[dict], workers: int = 0, start_step: int = 0) -> list:
    return list(make_loader(config(url, workers=workers), 1, 0, 1, start_step, cpu_augment=chain))


def same(a: list, b: list) -> bool:
    return [x.keys for x in a] == [x.keys for x in b] and all(
        np.array_equal(u.numpy(), v.numpy()) for x, y in zip(a, b) for u, v in zip(x.views, y.views))


def test_shard_sets_become_local_flac_folders_written_once(data):
    _, chain, cache = data
    folder = chain[1]["sounds_path"]
    assert folder.startswith(str(cache)) and "kind" not in chain[1]
    assert sorted(p.name for p in (cache / folder.split("/")[-2] / "noise").iterdir()) == [
        "0000000.flac", "0000001.flac", "0000002.flac"]  # the noise clips, not the music


def test_same_config_gives_the_same_augmented_batches_and_a_resume_the_same_from_its_step(data):
    url, chain, _ = data
    random.seed(1)  # the global generators audiomentations draws from: their state must not matter
    full = batches(url, chain)
    random.seed(2)
    assert same(batches(url, chain), full)
    assert same(batches(url, chain, start_step=3), full[3:])  # mid-chunk (chunk_steps 2)


def test_augmentation_changes_every_crop_of_the_same_items(data):
    url, chain, _ = data
    plain, augmented = batches(url, []), batches(url, chain)
    assert [b.keys for b in augmented] == [b.keys for b in plain]
    for a, p in zip(augmented, plain):
        for va, vp in zip(a.views, p.views):
            assert (va != vp).any(1).all()
            assert va.shape == vp.shape and va.dtype == vp.dtype


def test_views_of_an_item_get_their_own_draws(data, tmp_path):
    url, _, _ = data
    gain = prepare_cpu_augment([{"name": "Gain", "min_gain_db": -12.0, "max_gain_db": -1.0, "p": 1.0}], str(tmp_path))
    plain, gained = batches(url, []), batches(url, gain)
    ratios = [[np.sqrt(np.mean(g.numpy().astype(float) ** 2, 1) / np.mean(p.numpy().astype(float) ** 2, 1))
               for g, p in zip(gb.views, pb.views)] for gb, pb in zip(gained, plain)]
    ratios = np.array(ratios)  # [batch, view, item]
    assert ((ratios > 10 ** (-12.1 / 20)) & (ratios < 10 ** (-0.9 / 20))).all()  # the same crops, scaled
    assert (np.abs(ratios[:, 0] - ratios[:, 1]) > 1e-3).mean() > 0.9  # each view its own gain
    assert len(np.unique(ratios.round(4))) > 0.9 * ratios.size


def test_workers_give_the_same_augmented_batches_as_the_trainer(data):
    url, chain, _ = data
    assert same(batches(url, chain, workers=1), batches(url, chain))


def test_the_trainers_global_generators_are_left_alone(data):
    """With no workers the streams run in the trainer: its random and numpy draws stay its own."""
    url, chain, _ = data
    random.seed(5)
    np.random.seed(5)
    batches(url, chain)
    assert (random.random(), np.random.random()) == (random.Random(5).random(), np.random.RandomState(5).random())


def test_a_stream_with_cpu_augmentation_stays_torch_free_and_one_without_skips_audiomentations(data, tmp_path):
    url, chain, _ = data
    code = ("import pickle, sys; import voxstream.pipeline.workers; from voxstream.pipeline.batches import stream_batches; "
            "items, _ = next(stream_batches(pickle.load(open(sys.argv[1], 'rb')), 0, 1)); "
            "print('torch' in sys.modules, 'audiomentations' in sys.modules, items[0].views[0].dtype)")
    for name, cpu_augment, expected in (("augmented", chain, "False True int16"), ("plain", [], "False False int16")):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(make_loader(config(url), 0, 0, 1, cpu_augment=cpu_augment).plan))
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, out.stderr


def test_bad_entries_fail_in_the_trainer_naming_the_entry(data, tmp_path):
    _, _, cache = data
    with pytest.raises(ValueError, match="'NoSuchTransform' is not an audiomentations transform"):
        prepare_cpu_augment([{"name": "NoSuchTransform", "sounds_path": str(cache.parent / "musan")}],
                            str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()  # failed before copying anything
    with pytest.raises(ValueError, match="augment.cpu: Gain: .*min_gain_dbb"):
        prepare_cpu_augment([{"name": "Gain", "min_gain_dbb": 1.0}], str(tmp_path))
    with pytest.raises(ValueError, match="augment.cpu: Gain: min_gain_db cannot be greater"):
        prepare_cpu_augment([{"name": "Gain", "min_gain_db": 6.0, "max_gain_db": -6.0}], str(tmp_path))
    with pytest.raises(ValueError, match=r"augment.cpu\[1\]: expected \{name"):
        prepare_cpu_augment([{"name": "Gain"}, "Gain"], str(tmp_path))


def test_the_cache_folder_lives_with_a_local_run_else_in_the_temp_folder():
    assert default_cache_dir("runs/x") == "runs/x/cpu_augment_cache"
    assert default_cache_dir("file:///data/run") == "/data/run/cpu_augment_cache"
    assert default_cache_dir("s3://bucket/run").startswith(tempfile.gettempdir())
