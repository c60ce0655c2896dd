"""The installed import names: one `voxstream` namespace over the top-level folders, nothing else."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("shards", "pipeline", "model")


def test_every_package_folder_is_installed_under_voxstream():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {str(p.parent.relative_to(ROOT)).replace("/", ".")
               for top in FOLDERS for p in (ROOT / top).rglob("__init__.py")}
    assert set(config["packages"]) == {f"voxstream.{f}" for f in folders}
    assert config["package-dir"] == {f"voxstream.{f}": f for f in FOLDERS}


def test_outside_the_checkout_only_the_voxstream_names_import(tmp_path):
    """Run from elsewhere, so the checkout is not on sys.path: what the environment itself provides."""
    code = ("import importlib.util as u, voxstream.model.train, voxstream.pipeline.workers;"
            "print(voxstream.model.train.__file__);"
            "print([n for n in ('model', 'pipeline', 'shards') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    where, stray = out.stdout.splitlines()
    assert Path(where) == ROOT / "model" / "train.py"
    assert stray == "[]"


def test_tools_do_not_patch_sys_path():
    for tool in (ROOT / "tools").glob("*.py"):
        assert "sys.path" not in tool.read_text(), tool.name
