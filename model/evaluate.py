"""The evaluation job: trial lists -> embeddings -> scores -> EER / minDCF, figures and statistics.

Trial lists use the VoxCeleb format, one trial a line: `label enroll test` (label 1 = same speaker).
Outputs in the `out` folder: metrics.json, scores-<list>.txt (`score enroll test`), det.png,
hist-<list>.png, and cache/ (embeddings reused by later runs with the same weights and options).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import nn

from voxstream.model import metrics, plots, scoring
from voxstream.model.embeddings import EmbedOptions, EmbeddingCache, FileAudio, ShardAudio, model_fingerprint, trial_suffix
from voxstream.shards import storage

P_TARGETS = (0.01, 0.05)
log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    trials: list[str]
    audio_root: str = ""          # trial ids are paths under this folder ...
    shards: str = ""              # ... or samples of this shard set (see model.embeddings)
    cohort: str = ""              # shard set for AS-norm; empty: no score normalisation
    mean_from: str = ""           # shard set whose mean embedding is subtracted; empty: none
    set_utts: int = 5000          # utterances read from the cohort and mean sets
    top_n: int = 300              # AS-norm: highest cohort scores kept per utterance
    out: str = "eval-out"
    device: str = "cpu"
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    storage_options: dict = field(default_factory=dict)


@dataclass
class Trials:
    name: str
    path: str
    labels: np.ndarray
    enroll: list[str]
    test: list[str]


def read_trials(path: str, name: str = "") -> Trials:
    """Parse a trial list; a malformed line stops with its file and line number. Self-trials (enroll ==
    test) and repeated pairs are scored as given, with a warning that counts them: they bias the EER."""
    rows = []
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text trial list ({e})") from None
    for number, line in enumerate(text.split("\n"), 1):  # numbered as an editor shows them
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[0] not in ("0", "1"):
            raise ValueError(f"{path}:{number}: expected 'label enroll test' with label 0 or 1, got {line.strip()!r}")
        rows.append(parts)
    labels = np.array([int(r[0]) for r in rows], dtype=np.int8)
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError(f"{path}: needs both target (1) and non-target (0) trials")
    pairs = [(r[1], r[2]) for r in rows]
    self_trials, repeated = sum(e == t for e, t in pairs), len(pairs) - len(set(pairs))
    if self_trials or repeated:
        log.warning("%s: %d self-trial(s) (enroll == test) and %d repeated trial line(s) among %d, scored as given",
                    path, self_trials, repeated, len(pairs))
    return Trials(name or Path(path).stem, path, labels, [r[1] for r in rows], [r[2] for r in rows])


def speaker_similarity(ids: list[str], x: np.ndarray) -> dict | None:
    """Mean cosine between utterances of one speaker and of different speakers (speaker = first id part).

    Uses sums per speaker: the sum of cosines over all pairs of unit vectors is |sum|^2 - N.
    None when the ids carry no speaker or no speaker has two utterances.
    """
    if not all("/" in i for i in ids):
        return None
    speakers, which = np.unique([PurePosixPath(i).parts[0] for i in ids], return_inverse=True)
    counts = np.bincount(which)
    if len(speakers) < 2 or counts.max() < 2:
        return None
    sums = np.zeros((len(speakers), x.shape[1]))
    np.add.at(sums, which, x)
    n = len(ids)
    all_sum = float(np.square(x.sum(axis=0)).sum()) - n
    intra_sum = float(np.square(sums).sum()) - n
    intra_pairs = int((counts * (counts - 1)).sum())
    intra = intra_sum / intra_pairs
    inter = (all_sum - intra_sum) / (n * (n - 1) - intra_pairs)
    return {"speakers": len(speakers), "intra_cosine": round(intra, 4), "inter_cosine": round(inter, 4),
            "ratio": round(intra / inter, 3) if inter > 0 else None}


def _unique(lists: list[Trials]) -> list[str]:
    """Utterance ids in order of first appearance, line by line (so "first missing" means the first line)."""
    return list(dict.fromkeys(i for t in lists for pair in zip(t.enroll, t.test) for i in pair))


def embed_trials(embedder: nn.Module, cfg: EvalConfig, ids: list[str], fingerprint: str) -> tuple[np.ndarray, dict]:
    """Embeddings [len(ids), D] of the trial utterances, computing only those not cached."""
    where = os.path.abspath(cfg.audio_root) if cfg.audio_root else cfg.shards
    cache = EmbeddingCache(Path(cfg.out) / "cache", fingerprint, cfg.embed, f"trials:{where}")
    todo = [i for i in ids if i not in cache]
    stats = {"utterances": len(ids), "cached": len(ids) - len(todo), "computed": 0}
    if todo:
        if cfg.audio_root:
            audio = FileAudio.under(cfg.audio_root, todo, cfg.embed.workers)
        else:
            wanted = {trial_suffix(i): i for i in todo}
            audio = ShardAudio(cfg.shards, lambda key: wanted.get("/".join(key.split("/")[-3:])),
                               workers=cfg.embed.workers, storage_options=cfg.storage_options)
        stats.update(cache.fill(embedder, audio, cfg.embed, cfg.device, len(todo), "trial embeddings"))
        missing = [i for i in todo if i not in cache]
        if missing:
            failed = f" ({len(audio.failed)} shard(s) unreadable)" if audio.failed else ""
            raise FileNotFoundError(f"{cfg.shards}: {len(missing)} trial utterance(s) not in the shards{failed}, "
                                    "first: " + ", ".join(missing[:5]))
    return cache.matrix(ids), stats


def embed_set(embedder: nn.Module, cfg: EvalConfig, url: str, fingerprint: str) -> np.ndarray:
    """Embeddings of the first `cfg.set_utts` samples of a shard set (cohort or mean estimation).

    A set smaller than `set_utts` is read again on each run (to know it has no more), never re-embedded.
    """
    cache = EmbeddingCache(Path(cfg.out) / "cache", fingerprint, cfg.embed, f"set:{url}")
    if len(cache) < cfg.set_utts:
        audio = ShardAudio(url, lambda key: None if key in cache else key, cfg.set_utts - len(cache),
                           cfg.embed.workers, cfg.storage_options)
        cache.fill(embedder, audio, cfg.embed, cfg.device, cfg.set_utts - len(cache), f"embeddings of {url}")
    if len(cache) == 0:
        raise ValueError(f"{url}: no samples")
    return cache.matrix(list(cache.emb)[:cfg.set_utts])


def _score_list(t: Trials, index: dict[str, int], x: np.ndarray, norm: tuple | None) -> dict[str, np.ndarray]:
    enroll = np.array([index[i] for i in t.enroll])
    test = np.array([index[i] for i in t.test])
    scores = {"cosine": scoring.cosine(x, enroll, test)}
    if norm is not None:
        scores["as-norm"] = scoring.as_norm(scores["cosine"], enroll, test, *norm)
    return scores


def _metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    row = {"eer": metrics.eer(scores, labels), "eer_threshold": metrics.eer_threshold(scores, labels)}
    row.update({f"min_dcf_{p:g}": metrics.min_dcf(scores, labels, p) for p in P_TARGETS})
    return {k: round(v, 6) for k, v in row.items()}


def session_of(utt_id: str) -> str | None:
    """The recording an id comes from: `speaker/session` of VoxCeleb's `speaker/video/utterance` ids (also
    below further folders); None for ids without that depth."""
    parts = PurePosixPath(utt_id).parts
    return "/".join(parts[-3:-1]) if len(parts) >= 3 else None


def by_session(t: Trials, scores: np.ndarray) -> dict | None:
    """EER of the same-session and of the cross-session target trials, each kind against every non-target.

    A model that leans on the recording's channel rather than the voice scores its same-session
    targets far better than the others: the gap is the shortcut that same-utterance positives teach.
    None when an id names no session or one kind has no target trial (the breakdown would repeat the EER).
    """
    session = {i: session_of(i) for i in {*t.enroll, *t.test}}  # once per utterance, not per trial
    if None in session.values():
        return None
    same = np.array([session[e] == session[u] for e, u in zip(t.enroll, t.test)])
    target = t.labels == 1
    out = {}
    for kind, chosen in (("same_session", same), ("cross_session", ~same)):
        targets = int((target & chosen).sum())
        if not targets:
            return None
        keep = ~target | chosen
        out[kind] = {"targets": targets, "eer": round(metrics.eer(scores[keep], t.labels[keep]), 6)}
    return out


def read_trial_lists(paths: list[str]) -> list[Trials]:
    """Every list parsed up front, so a bad one stops the job before any embedding is computed."""
    lists = [read_trials(p) for p in paths]
    names = [t.name for t in lists]
    for k, t in enumerate(lists):   # two lists with one file name still get distinct outputs
        if names.count(t.name) > 1:
            t.name = f"{t.name}-{k + 1}"
    return lists


def check_source(cfg: EvalConfig) -> None:
    if bool(cfg.audio_root) == bool(cfg.shards):
        raise ValueError("give exactly one audio source: audio_root or shards")
    if cfg.audio_root and not os.path.isdir(cfg.audio_root):
        raise FileNotFoundError(f"{cfg.audio_root}: audio root is not a folder")


def evaluate(embedder: nn.Module, cfg: EvalConfig, lists: list[Trials] | None = None, model_name: str = "") -> dict:
    """Run the whole evaluation, write its outputs to cfg.out and return the metrics dict."""
    check_source(cfg)
    lists = lists if lists is not None else read_trial_lists(cfg.trials)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = _unique(lists)
    fingerprint = model_fingerprint(embedder)
    emb, embed_stats = embed_trials(embedder, cfg, ids, fingerprint)

    mean = embed_set(embedder, cfg, cfg.mean_from, fingerprint).mean(axis=0) if cfg.mean_from else None
    x = scoring.prepare(emb, mean)
    norm = None
    if cfg.cohort:
        cohort = scoring.prepare(embed_set(embedder, cfg, cfg.cohort, fingerprint), mean)
        norm = scoring.cohort_stats(x, cohort, cfg.top_n)

    index = {i: k for k, i in enumerate(ids)}
    unit = scoring.prepare(emb)   # speaker statistics on the raw embeddings, as the SSL literature reports them
    results, det_curves = {}, {}
    for t in lists:
        scores = _score_list(t, index, x, norm)
        kind, final = list(scores.items())[-1]
        rows = {name: _metrics(s, t.labels) for name, s in scores.items()}
        list_ids = _unique([t])
        results[t.name] = {"path": t.path, "trials": len(t.labels), "targets": int(t.labels.sum()),
                           "scoring": rows, "sessions": by_session(t, final),
                           "speakers": speaker_similarity(list_ids, unit[[index[i] for i in list_ids]])}
        with open(out / f"scores-{t.name}.txt", "w") as f:
            f.writelines(f"{s:.6f} {e} {u}\n" for s, e, u in zip(final, t.enroll, t.test))
        det_curves[f"{t.name} {kind}"] = (final, t.labels, rows[kind]["eer"])
        plots.plot_histogram(final, t.labels, out / f"hist-{t.name}.png", f"{t.name} ({kind})",
                             metrics.eer_threshold(final, t.labels))
    plots.plot_det(det_curves, out / "det.png")

    report = {"model": model_name, "fingerprint": fingerprint[:16], "source": cfg.audio_root or cfg.shards,
              "cohort": cfg.cohort or None, "mean_from": cfg.mean_from or None, "top_n": cfg.top_n,
              "embedding": {**asdict(cfg.embed), **embed_stats}, "lists": results}
    storage.write_json(str(out / "metrics.json"), report)   # last and atomic: its presence means a complete run
    print(format_table(report))
    return report


def format_table(report: dict) -> str:
    """The printed summary: one row per trial list and scoring, then speaker statistics and throughput."""
    lines = [f"{'trial list':<24}{'scoring':<10}{'trials':>9}{'EER %':>9}{'minDCF0.01':>12}{'minDCF0.05':>12}"]
    for name, r in report["lists"].items():
        for kind, m in r["scoring"].items():
            lines.append(f"{name:<24}{kind:<10}{r['trials']:>9}{100 * m['eer']:>9.2f}"
                         f"{m['min_dcf_0.01']:>12.4f}{m['min_dcf_0.05']:>12.4f}")
    for name, r in report["lists"].items():
        if r["speakers"]:
            s = r["speakers"]
            lines.append(f"{name}: {s['speakers']} speakers, mean cosine intra {s['intra_cosine']:.3f}, "
                         f"inter {s['inter_cosine']:.3f}, ratio {s['ratio']}")
        if r.get("sessions"):
            same, cross = r["sessions"]["same_session"], r["sessions"]["cross_session"]
            lines.append(f"{name}: EER {100 * same['eer']:.2f}% on same-session targets ({same['targets']}), "
                         f"{100 * cross['eer']:.2f}% on cross-session targets ({cross['targets']})")
    e = report["embedding"]
    line = f"embeddings: {e['utterances']} utterances, {e['cached']} from cache, {e['computed']} computed"
    if e["computed"]:
        line += (f" in {e['wall_seconds']:.1f} s ({e['utterances_per_second']} utt/s, "
                 f"{e['realtime_factor']}x real time)")
    return "\n".join(lines + [line])


def load_embedder(checkpoint: str = "", config: str = "", untrained: bool = False, seed: int = 0,
                  storage_options: dict | None = None) -> tuple[nn.Module, str]:
    """(embedder, name): a checkpoint's trained network, or with `untrained` the same architecture at
    initialisation, built from the recipe file `config` or from the checkpoint's own recipe."""
    from voxstream.model.checkpoint import load_method
    from voxstream.model.methods import build_method
    from voxstream.model.recipe import load_recipe

    if not untrained:
        method, _ = load_method(checkpoint, storage_options)
        return method.embedder().eval(), checkpoint
    torch.manual_seed(seed)
    if config:
        recipe = load_recipe(config)   # validates the file the way training does
        method = build_method(recipe.model, recipe.method)
    else:
        method, recipe = load_method(checkpoint, storage_options, trained=False)
    name = f"untrained {recipe.method.name} {recipe.model.name} from {config or checkpoint} (seed {seed})"
    return method.embedder().eval(), name
