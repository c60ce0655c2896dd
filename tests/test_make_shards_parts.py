"""make_shards.py across machines: parts written by separate processes (--part I/N), then one finalize
that must give exactly the one-machine set."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_make_shards import LIBRI, corpus, run, samples, write
from voxstream.shards import format as fmt
from voxstream.shards import storage


def test_parts_on_two_processes_then_finalize_equal_a_one_machine_run(tmp_path, s3_url):
    root = tmp_path / "src"
    corpus(root, speakers=4)
    write(root / "300" / "3000" / "300-3000-0000.wav", np.zeros(8000, np.float32))  # rejected: silent
    args = ["folder", "--root", root, "--pattern", LIBRI, "--shard-size", "100k", "--seed", "2"]
    assert run(*args, "--out", f"{s3_url}/one") == 0
    out = f"{s3_url}/parts"
    tool = [os.sys.executable, str(Path(__file__).parents[1] / "tools" / "make_shards.py"), *map(str, args), "--out", out]
    parts = [subprocess.Popen([*tool, "--part", f"{i}/2"], env=os.environ, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
    logs = [p.communicate(timeout=180)[0] for p in parts]
    assert [p.returncode for p in parts] == [0, 0], logs
    assert "part 1/2:" in logs[0] and "part 0/2:" in logs[1]
    assert not storage.exists(f"{out}/{fmt.MANIFEST}"), "a part alone never writes the set's manifest"
    assert run(*args, "--out", out, "--finalize", "2") == 0
    one, assembled = fmt.read_manifest(f"{s3_url}/one"), fmt.read_manifest(out)
    assert assembled == one and len(one.shards) >= 3
    for name in [s["name"] for s in one.shards] + [fmt.MANIFEST, fmt.REJECTED]:
        assert storage.read_bytes(f"{out}/{name}") == storage.read_bytes(f"{s3_url}/one/{name}"), name
    fs, path = storage.filesystem(out)
    fs.invalidate_cache(path)
    assert sorted(p[len(path) + 1:] for p in fs.find(path)) == \
        sorted([s["name"] for s in one.shards] + [fmt.MANIFEST, fmt.REJECTED]), "the parts are removed"
    keys = [s.key for s in samples(out)]
    assert len(keys) == len(set(keys)) == 24  # every utterance once


def test_finalize_names_the_part_that_is_not_finished(tmp_path, capsys):
    root = tmp_path / "src"
    corpus(root, speakers=2)
    args = ["folder", "--root", root, "--pattern", LIBRI, "--out", tmp_path / "out"]
    assert run(*args, "--part", "1/2") == 0
    assert run(*args, "--finalize", "2") == 2
    assert (f"--finalize 2: part 0/2 is not finished (no manifest in {tmp_path / 'out' / '_parts' / '00000-of-00002'})"
            in capsys.readouterr().err)
    assert run(*args, "--part", "0/2") == 0 and run(*args, "--finalize", "2") == 0
    assert len(samples(str(tmp_path / "out"))) == 12
    with pytest.raises(SystemExit):
        run(*args, "--part", "2/2")
    assert "argument --part: '2/2': needs 0 <= I < N" in capsys.readouterr().err
