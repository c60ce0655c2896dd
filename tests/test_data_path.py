"""The data path at scale: storage reads counted per worker, the node-local shard cache (shards/cache.py)
under many processes, and fsspec's chained URLs wherever a shard set is named."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from voxstream.model.embeddings import EmbedOptions
from voxstream.model.evaluate import EvalConfig, evaluate
from voxstream.model.recipe import RecipeError, load_recipe
from voxstream.pipeline.augment import AugmentConfig, Augmenter
from voxstream.pipeline.banks import write_clip_set
from voxstream.pipeline.loader import make_loader
from voxstream.pipeline.sources import open_shard, resolve, split_patterns
from ramps import config, make_set
from voxstream.shards import storage
from voxstream.shards.cache import ShardCache
from voxstream.shards.format import shard_urls


def _cache_files(root) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_file())


# ---------------------------------------------------------------- measuring

def test_storage_reads_are_counted_per_worker_and_per_pair(tmp_path):
    url = str(tmp_path / "set")
    make_set(url, [12, 12])
    loader = make_loader(config(url, workers=2, steps_per_epoch=8), 0, 0, 1)
    list(loader)
    stats = loader.stats
    assert stats["pairs"] == 8 * 4
    assert stats["storage_requests"] > 0 and stats["storage_bytes"] > 0
    assert len(stats["workers"]) == 2 and all(w["storage_bytes"] > 0 for w in stats["workers"])
    assert sum(w["storage_bytes"] for w in stats["workers"]) == stats["storage_bytes"]
    assert stats["bytes_per_pair"] == stats["storage_bytes"] / stats["pairs"]
    assert stats["requests_per_pair"] == stats["storage_requests"] / stats["pairs"]
    # Whole utterances are read for 0.5-s crops of 1-2.5-s utterances: several times the crop bytes.
    assert 1.5 < stats["read_amplification"] < 50


# ---------------------------------------------------------------- the cache

def test_a_second_pass_over_cached_shards_reads_nothing_from_the_bucket(s3_url, tmp_path):
    make_set(s3_url, [10, 10])
    cfg = config(s3_url, workers=2, steps_per_epoch=12, cache_dir=str(tmp_path / "cache"))
    first = make_loader(cfg, 0, 0, 1)
    list(first)
    assert first.stats["storage_bytes"] > 0 and len(_cache_files(tmp_path / "cache")) == 2
    # Gone from the bucket (the manifest stays): a read from storage now fails and skips the shard.
    fs, _ = storage.filesystem(s3_url)
    for shard in shard_urls(s3_url):
        fs.rm(storage.filesystem(shard)[1])
    second = make_loader(cfg, 1, 0, 1)
    assert sum(len(b.keys) for b in second) == 12 * 4
    assert second.stats["shards_skipped"] == 0
    assert second.stats["storage_bytes"] == second.stats["storage_requests"] == 0


FILL = textwrap.dedent("""
    import hashlib, json, sys
    from voxstream.pipeline.sources import open_shard
    from voxstream.shards.cache import ShardCache
    root, urls = sys.argv[1], json.loads(sys.argv[2])
    fetched, digests = [], {}
    for url in urls:
        with open_shard(url, cache=ShardCache(root, 1 << 40), on_fetch=fetched.append) as f:
            digests[url] = hashlib.sha256(f.read()).hexdigest()
    print(json.dumps({"digests": digests, "fetched": sum(fetched)}))
""")


def test_concurrent_workers_filling_the_cache_never_see_a_partial_shard(s3_url, tmp_path):
    rng = np.random.default_rng(0)
    blobs = {f"{s3_url}/blob-{i}.tar": rng.bytes(6 << 20) for i in range(4)}
    for url, data in blobs.items():
        storage.write_bytes(url, data)
    truth = {url: hashlib.sha256(data).hexdigest() for url, data in blobs.items()}
    root = tmp_path / "cache"
    root.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", FILL, str(root), json.dumps(list(blobs)[k:] + list(blobs)[:k])],
                              stdout=subprocess.PIPE, text=True) for k in range(4)]
    seen = 0
    try:
        while any(p.poll() is None for p in procs):  # every shard that appears under its name is whole
            for name in _cache_files(root):
                with open(root / name, "rb") as f:
                    assert hashlib.sha256(f.read()).hexdigest() in truth.values(), f"{name}: a partial shard"
                seen += 1
        results = [json.loads(p.communicate()[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert all(r["digests"] == truth for r in results)
    # One process copies each shard; the others wait for it and read its copy.
    assert sum(r["fetched"] for r in results) == sum(map(len, blobs.values()))
    assert seen > 0 and len(_cache_files(root)) == 4


def test_eviction_keeps_the_cache_under_its_bound_least_recently_used_first(s3_url, tmp_path):
    rng = np.random.default_rng(1)
    urls = [f"{s3_url}/s-{i}.tar" for i in range(5)]
    for url in urls:
        storage.write_bytes(url, rng.bytes(100_000))
    cache = ShardCache(str(tmp_path / "cache"), 250_000)  # two shards and a half

    def use(i: int) -> None:
        with open_shard(urls[i], cache=cache) as f:
            assert len(f.read()) == 100_000
        files = _cache_files(cache.root)
        assert sum(os.path.getsize(os.path.join(cache.root, n)) for n in files) <= cache.max_bytes
        time.sleep(0.01)  # distinct modification times

    use(0), use(1), use(0), use(2)  # 0 used after 1: 1 is the least recently used
    assert _cache_files(cache.root) == sorted(os.path.basename(cache.entry(u)) for u in (urls[0], urls[2]))
    for i in (3, 4):
        use(i)
    assert _cache_files(cache.root) == sorted(os.path.basename(cache.entry(u)) for u in urls[3:])


def test_the_cache_settings_are_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: simclr}\n")
    assert load_recipe(str(recipe), ["data.cache_dir=/scratch/c", "data.cache_gb=2.5"]).data.shard_cache == \
        ShardCache("/scratch/c", 2_500_000_000)
    with pytest.raises(RecipeError, match="data.cache_gb"):
        load_recipe(str(recipe), ["data.cache_gb=0"])
    with pytest.raises(RecipeError, match="data.cache_dir"):
        load_recipe(str(recipe), ["data.cache_dir=s3://b/cache"])


# ---------------------------------------------------------------- chained URLs

def test_patterns_split_at_double_colons_but_keep_their_fsspec_layers():
    assert split_patterns("a-{0..1}.tar::s3://b/c.tar") == ["a-{0..1}.tar", "s3://b/c.tar"]
    assert split_patterns("simplecache::s3://b/a-{0..1}.tar::filecache::s3://b/c.tar") == [
        "simplecache::s3://b/a-{0..1}.tar", "filecache::s3://b/c.tar"]
    with pytest.raises(ValueError, match="no URL after it"):
        split_patterns("s3://b/a.tar::simplecache")


def bucket_options_only(s3_server, monkeypatch) -> dict:
    """The bucket's storage options, with its AWS_* variables unset: only options that reach the end
    of a chain (not its first layer) can read the bucket."""
    for name in s3_server.env:
        monkeypatch.delenv(name)
    return s3_server.storage_options()


@pytest.mark.parametrize("spec", ["prefix", "pattern"])
def test_chained_urls_in_data_train(spec, s3_url, s3_server, monkeypatch):
    truth = make_set(s3_url, [6, 6])
    options = bucket_options_only(s3_server, monkeypatch)
    chained = f"simplecache::{s3_url}"
    train = chained if spec == "prefix" else f"{chained}/syn-{{000000..000001}}.tar"
    assert [s.url for s in resolve(train, options).shards] == [f"{chained}/syn-{i:06d}.tar" for i in range(2)]
    loader = make_loader(config(train, workers=2, steps_per_epoch=4, storage_options=options), 0, 0, 1)
    keys = [k for b in loader for k in b.keys]
    assert len(keys) == 16 and set(keys) <= set(truth) and loader.stats["shards_skipped"] == 0


def test_chained_urls_in_augment_noise(s3_url, tmp_path, s3_server, monkeypatch):
    rng = np.random.default_rng(2)
    clips = [("noise", (rng.standard_normal(16000) * 2000).astype(np.int16)) for _ in range(3)]
    write_clip_set(s3_url, "musan", clips)
    write_clip_set(str(tmp_path / "local"), "musan", clips)
    options = bucket_options_only(s3_server, monkeypatch)
    chained = AugmentConfig(noise=f"simplecache::{s3_url}", segment_seconds=1.0, storage_options=options)
    local = AugmentConfig(noise=str(tmp_path / "local"), segment_seconds=1.0)
    assert torch.equal(Augmenter.from_config(chained, "cpu").noise.data, Augmenter.from_config(local, "cpu").noise.data)


class Loudness(nn.Module):
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.stack([wave.abs().mean(1), wave.std(1), wave[:, ::2].mean(1)], 1)


def test_chained_urls_in_evaluate_shards(s3_url, tmp_path, s3_server, monkeypatch):
    truth = make_set(s3_url, [6, 6], group_size=2)
    make_set(str(tmp_path / "local"), [6, 6], group_size=2)
    ids = ["/".join(key.split("/")[1:]) + ".wav" for key in sorted(truth)]
    trials = tmp_path / "trials.txt"
    trials.write_text("".join(f"{int(a.split('/')[0] == b.split('/')[0])} {a} {b}\n" for a in ids for b in ids if a < b))
    options = bucket_options_only(s3_server, monkeypatch)
    scores = {}
    for where, shards, opts in (("chained", f"simplecache::{s3_url}", options), ("local", str(tmp_path / "local"), {})):
        evaluate(Loudness(), EvalConfig(trials=[str(trials)], shards=shards, out=str(tmp_path / where),
                                        embed=EmbedOptions(workers=1), storage_options=opts))
        scores[where] = (tmp_path / where / "scores-trials.txt").read_text()
    assert scores["chained"] == scores["local"] and len(scores["local"].splitlines()) == len(ids) * (len(ids) - 1) // 2
