"""tools/bench.py pipeline and gpu end to end on tiny generated data: every figure, measured, as JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_bench_reports_every_figure_against_its_baseline():
    out = subprocess.run([sys.executable, "tools/bench.py", "pipeline", "--utterances", "24", "--steps", "1",
                          "--batch-size", "8", "--no-s3"], cwd=ROOT, capture_output=True, text=True, check=True)
    rows = {row["figure"]: row for row in map(json.loads, out.stdout.splitlines())}
    assert set(rows) == {f"synthetic_{f}" for f in (
        "decode_pairs_per_core", "local_pairs_per_core", "local_pairs_per_second", "local_peak_rss_per_worker_mb",
        "local_peak_pss_per_worker_mb", "local_peak_private_per_worker_mb", "cpu_augment_pairs_per_core",
        "local_data_path")}
    path = rows.pop("synthetic_local_data_path")
    assert path["bytes_per_pair"] > 0 and path["requests_per_pair"] > 0 and path["read_amplification"] > 1
    for row in rows.values():
        assert row["value"] > 0 and row["baseline"] > 0, row
    assert rows["synthetic_local_pairs_per_core"]["pairs"] == 16 * 2 * 8  # whole chunks of both workers
    # the pipeline's workers never import torch; the baseline's DataLoader workers are forks of this process
    assert rows["synthetic_local_peak_rss_per_worker_mb"]["value"] < rows["synthetic_local_peak_rss_per_worker_mb"]["baseline"]


def test_pipeline_bench_reports_the_data_path_from_s3_with_a_cold_and_a_warm_cache():
    out = subprocess.run([sys.executable, "tools/bench.py", "pipeline", "--utterances", "24", "--steps", "1",
                          "--batch-size", "8"], cwd=ROOT, capture_output=True, text=True, check=True)
    rows = {row["figure"]: row for row in map(json.loads, out.stdout.splitlines())}
    s3, cold, warm = (rows[f"synthetic_s3{f}_data_path"] for f in ("", "_cache_cold", "_cache_warm"))
    assert s3["bytes_per_pair"] > 0 and cold["bytes_per_pair"] > 0 and cold["requests_per_pair"] > 0
    assert warm["storage_bytes"] == warm["storage_requests"] == 0 and warm["pairs_per_second"] > 0


def test_gpu_bench_dry_run_on_cpu_writes_every_figure_with_its_target(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, "tools/bench.py", "gpu", "--device", "cpu", "--out", str(out), "--tiny",
                    "--crops", "8", "--seconds", "0.5", "--simclr-batch", "2", "--dino-batch", "2", "--steps", "1",
                    "--warmup", "0", "--no-compile", "--run-steps", "4", "--workers", "1", "--utterances", "16"],
                   cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    figures = report["figures"]
    assert set(figures) == {"augment_ms", "simclr_step_ms", "dino_step_ms", "run_data_wait"}  # compiled: --no-compile
    for name, figure in figures.items():
        assert "target" in figure, name
        for key in ("value", "peak_memory_mb") + (("workers_needed", "utt_per_worker_cpu_s") if name == "run_data_wait"
                                                   else ()):
            assert isinstance(figure[key], (int, float)) and figure[key] > 0, (name, key, figure)
    assert figures["dino_step_ms"]["views_s"] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]  # 2 x 2s + 4 x s
    assert figures["run_data_wait"]["value"] < 1
