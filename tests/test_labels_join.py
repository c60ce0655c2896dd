"""data.labels: a labels file joined in the loader streams, its labels the batches' groups."""
from __future__ import annotations

import numpy as np
import pytest

from ramps import config, make_set
from voxstream.pipeline.loader import group_ids, make_loader
from voxstream.shards.format import read_manifest
from voxstream.shards.labels import write_labels


def labels_for(url: str, keys: list[str], out: str, label=lambda i: i % 5) -> dict[str, int]:
    """A labels file for the set at `url` (its shards named in info, as pseudo_label.py writes them)."""
    made_from = [{"name": s["name"], "sha256": s["sha256"]} for s in read_manifest(url).shards]
    truth = {k: label(i) for i, k in enumerate(sorted(keys))}
    write_labels(out, list(truth), np.array(list(truth.values())), {"set": made_from})
    return truth


@pytest.mark.parametrize("workers", [0, 1])
def test_every_item_carries_its_label_as_its_group(tmp_path, workers):
    url = str(tmp_path / "set")
    truth = labels_for(url, list(make_set(url, [12, 12])), str(tmp_path / "labels.npz"))
    loader = make_loader(config(url, labels=str(tmp_path / "labels.npz"), workers=workers), 0, 0, 1)
    for batch in loader:
        assert batch.labels == [truth[k] for k in batch.keys]
        assert batch.groups == [f"label-{truth[k]}" for k in batch.keys]
        assert group_ids(batch, "cpu").tolist() == batch.labels  # AAM's classes; SimCLR's masking unchanged
    assert loader.stats["unlabeled"] == 0


def test_utterances_without_a_label_are_skipped_and_counted(tmp_path):
    url = str(tmp_path / "set")
    keys = sorted(make_set(url, [12, 12]))
    labels_for(url, keys[::2], str(tmp_path / "half.npz"))
    loader = make_loader(config(url, labels=str(tmp_path / "half.npz")), 0, 0, 1)
    seen = {k for batch in loader for k in batch.keys}
    assert seen <= set(keys[::2]) and loader.stats["unlabeled"] > 0
    plain = make_loader(config(url), 0, 0, 1)
    assert next(iter(plain)).labels is None and plain.stats["unlabeled"] == 0


def test_a_labels_file_for_another_set_or_none_at_all_is_one_clear_error(tmp_path):
    url, other = str(tmp_path / "set"), str(tmp_path / "other")
    keys = list(make_set(url, [12]))
    make_set(other, [12], seed=1)
    labels_for(other, keys, str(tmp_path / "other.npz"))
    with pytest.raises(ValueError, match=r"data.labels .*other.npz: made for another shard set \(1 shards"):
        make_loader(config(url, labels=str(tmp_path / "other.npz")), 0, 0, 1)
    with pytest.raises(FileNotFoundError, match="missing.npz: labels file not found"):
        make_loader(config(url, labels=str(tmp_path / "missing.npz")), 0, 0, 1)
