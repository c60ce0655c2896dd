"""A run report to read at a glance: report.png (curves from metrics.jsonl) and report.md (the verdict,
the evaluation table when there is one, the recipe), written into the run folder (a path or bucket URL).

The verdict reads the last tenth of the logged steps against the first:
- collapsed when the embeddings stopped spreading: a mean per-dimension std under a tenth of the
  1/sqrt(D) a spread-out sphere gives, an effective rank under 2 (all on a line), or a DINO teacher
  whose entropy is near 0 (one prototype wins) or near log K (uniform);
- learned when the loss fell by at least 5% without collapse; otherwise "did not learn".
"""
from __future__ import annotations

import io
import json
import math
from pathlib import PurePosixPath

import numpy as np
import yaml

from voxstream.model.checkpoint import latest_checkpoint, read_checkpoint
from voxstream.model.logs import METRICS
from voxstream.model.plots import new_figure
from voxstream.shards import storage

CURVES = [("loss", "loss"), ("lr", "learning rate"), ("embedding_std", "embedding std"),
          ("effective_rank", "effective rank"), ("teacher_entropy", "DINO teacher entropy (nats)"),
          ("utt_per_s", "throughput (utterances/s)"), ("data_wait", "data wait (fraction of step)")]


def read_steps(run: str, storage_options: dict | None = None) -> list[dict]:
    """The training rows of a run's metrics.jsonl, one per step (the last written wins after a resume)."""
    rows: dict[int, dict] = {}
    text = storage.read_bytes(storage.join(run, METRICS), storage_options).decode()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(text.splitlines()):   # a line cut by a kill mid-write
                break
            raise ValueError(f"{storage.join(run, METRICS)}:{n}: not JSON") from None
        if "loss" in row:
            rows[row["step"]] = row
    if not rows:
        raise ValueError(f"{storage.join(run, METRICS)}: no training steps logged")
    return [rows[s] for s in sorted(rows)]


def _tail_and_head(rows: list[dict], key: str) -> tuple[float, float] | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not values:
        return None
    k = max(1, len(values) // 10)
    return float(np.median(values[:k])), float(np.median(values[-k:]))


def verdict(rows: list[dict], embed_dim: int | None, prototypes: int | None = None) -> tuple[str, list[str]]:
    """("learned" | "collapsed" | "did not learn", the reasons, one line each)."""
    reasons = []
    std = _tail_and_head(rows, "embedding_std")
    if std and embed_dim and std[1] < 0.1 / math.sqrt(embed_dim):
        reasons.append(f"embedding std {std[1]:.4f} at the end, under a tenth of 1/sqrt({embed_dim}) = "
                       f"{1 / math.sqrt(embed_dim):.4f}: the embeddings are (nearly) constant")
    rank = _tail_and_head(rows, "effective_rank")
    if rank and rank[1] < 2:
        reasons.append(f"effective rank {rank[1]:.2f} at the end: the embeddings lie on a line")
    entropy = _tail_and_head(rows, "teacher_entropy")
    if entropy and entropy[1] < 0.05:
        reasons.append(f"DINO teacher entropy {entropy[1]:.3f} nats: one prototype takes every input")
    if entropy and prototypes and entropy[1] > 0.98 * math.log(prototypes):
        reasons.append(f"DINO teacher entropy {entropy[1]:.2f} of log K = {math.log(prototypes):.2f}: uniform output")
    if reasons:
        return "collapsed", reasons
    loss = _tail_and_head(rows, "loss")
    change = (loss[1] - loss[0]) / abs(loss[0]) if loss and loss[0] else 0.0
    line = f"loss {loss[0]:.4g} -> {loss[1]:.4g} ({100 * change:+.1f}%) over {rows[-1]['step']} steps"
    return ("learned", [line]) if change <= -0.05 else ("did not learn", [line + ": it did not fall by 5%"])


def plot_curves(rows: list[dict], embed_dim: int | None) -> bytes:
    curves = [(key, title) for key, title in CURVES if any(key in r for r in rows)]
    cols = 3
    fig = new_figure((4.2 * cols, 2.8 * math.ceil(len(curves) / cols)))
    for k, (key, title) in enumerate(curves, 1):
        ax = fig.add_subplot(math.ceil(len(curves) / cols), cols, k)
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), linewidth=1.0)
        if key == "embedding_std" and embed_dim:
            ax.axhline(1 / math.sqrt(embed_dim), color="grey", linestyle=":", linewidth=0.8, label="1/sqrt(D)")
            ax.axhline(0.1 / math.sqrt(embed_dim), color="red", linestyle=":", linewidth=0.8, label="collapse")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, linewidth=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def eval_table(evaluations: dict[str, dict]) -> list[str]:
    lines = ["| evaluation | trial list | scoring | trials | EER % | minDCF 0.01 | EER threshold |",
             "|---|---|---|---:|---:|---:|---:|"]
    for where, report in evaluations.items():
        for name, r in report["lists"].items():
            for kind, m in r["scoring"].items():
                threshold = f"{m['eer_threshold']:.4f}" if "eer_threshold" in m else "-"
                lines.append(f"| {where} | {name} | {kind} | {r['trials']} | {100 * m['eer']:.2f} | "
                             f"{m['min_dcf_0.01']:.4f} | {threshold} |")
    return lines


def find_evaluations(run: str, extra: list[str], storage_options: dict | None = None) -> dict[str, dict]:
    """evaluate.py outputs: `<run>/*/metrics.json` plus the `extra` metrics.json paths or URLs."""
    fs, path = storage.filesystem(run, storage_options)
    found = sorted(fs.glob(f"{path.rstrip('/')}/*/metrics.json"))
    urls = [storage.join(run, str(PurePosixPath(p).parent.name), "metrics.json") for p in found] + list(extra)
    return {url: storage.read_json(url, storage_options) for url in urls}


def write_report(run: str, evaluations: list[str] = (), storage_options: dict | None = None) -> tuple[str, str]:
    """Write report.png and report.md into `run`; returns (the verdict, the report.md URL)."""
    rows = read_steps(run, storage_options)
    ckpt = latest_checkpoint(run, storage_options)
    recipe = read_checkpoint(ckpt, storage_options)["recipe"] if ckpt else None
    embed_dim = recipe["model"].get("embed_dim") if recipe else None
    prototypes = (recipe["method"].get("out_dim") if recipe and recipe["method"].get("name") == "dino" else None)
    state, reasons = verdict(rows, embed_dim, prototypes)
    storage.write_bytes(storage.join(run, "report.png"), plot_curves(rows, embed_dim), storage_options)
    last = rows[-1]
    lines = [f"# Run report: {run}", "", f"**{state.upper()}**", ""] + [f"- {r}" for r in reasons] + [
        f"- last step {last['step']} (epoch {last.get('epoch', '?')}), "
        f"{last.get('utt_per_s', float('nan')):.1f} utterances/s, data wait {100 * last.get('data_wait', 0):.1f}%",
        "", "![training curves](report.png)", ""]
    found = find_evaluations(run, list(evaluations), storage_options)
    lines += ["## Evaluation", ""] + (eval_table(found) if found else ["no evaluation found"]) + [""]
    lines += ["## Recipe", "", f"from {ckpt}" if ckpt else "no checkpoint found", ""]
    if recipe:
        lines += ["```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    url = storage.join(run, "report.md")
    storage.write_bytes(url, "\n".join(lines).encode(), storage_options)
    return state, url
