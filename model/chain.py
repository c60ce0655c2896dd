"""Training beyond same-utterance positives, as one resumable chain of the existing tools:

    same-utterance SSL -> N rounds of (pseudo-labels from the previous model -> training on them) -> evaluation

The run folder (a local folder) holds every stage's output; a stage whose output is complete is skipped, and an
incomplete one is rerun and resumes by itself (train.py from its newest checkpoint, pseudo_label.py
skipping the shards it already embedded):

    RUN/stage0-ssl/train/     the first model (train.out_dir; last.pt: done)
    RUN/roundK/labels.npz     pseudo-speakers from the previous model (labels-work/: its embeddings)
    RUN/roundK/shards/        with a cross-utterance round recipe (data.mode=cross-utterance): the set
                              regrouped by those pseudo-speakers (make_shards.py regroup; they become its
                              groups), so that two utterances of one pseudo-speaker meet in a shard visit
    RUN/roundK/train/         round K's model, trained on those labels (data.labels; method.classes for AAM)
    RUN/<stage>/eval/         a model's evaluation before the last (evaluate.each_stage; metrics.json: done)
    RUN/eval/                 the last model's evaluation
    RUN/summary.json          per stage: steps, its labels' NMI and purity, its EER (written last)

A round fine-tunes the model that made its labels (`train.init`; its heads start fresh), as
Hyperion's rounds do; `rounds.fine_tune=false` trains each round from scratch, as the AAM stage of
Miara, Lepage & Dehak does. At the demo's few hundred steps, training AAM from scratch on pseudo-labels
ends far behind the SSL model that made them (32% EER against 19%), so fine-tuning is the default.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from voxstream.model.recipe import (RecipeError, apply_overrides, build_section, load_recipe, read_yaml,
                                    redact_override)
from voxstream.shards import storage
from voxstream.shards.format import MANIFEST
from voxstream.shards.labels import read_labels

TOOLS = Path(__file__).resolve().parent.parent / "tools"


class ChainError(RuntimeError):
    """A stage failed; the message names it (rerunning the same command resumes there)."""


@dataclass
class CommonConfig:
    shards: str = ""                # the shard set every stage trains on (data.train) and pseudo-labels
    overrides: list[str] = field(default_factory=list)  # key=value for every training stage (noise banks, workers)
    nproc: int = 1                  # processes per stage (torchrun when > 1; evaluation runs in one)

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("common.shards: name the shard set to train on and label")
        if self.nproc < 1:
            raise ValueError(f"common.nproc: must be at least 1, got {self.nproc}")


@dataclass
class StageConfig:
    recipe: str = ""                # training recipe YAML (configs/*.yaml)
    overrides: list[str] = field(default_factory=list)  # key=value for that recipe
    epochs: int = 0                 # this stage's train.epochs (0: the recipe's own): sets the total steps


@dataclass
class RoundsConfig(StageConfig):
    count: int = 1                  # pseudo-label rounds after the first stage (0: plain SSL)
    fine_tune: bool = True          # a round's encoder starts from the model that made its labels (train.init),
                                    # as Hyperion's rounds fine-tune; false: from scratch, as Miara et al.'s AAM stage

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"rounds.count: must be >= 0, got {self.count}")


@dataclass
class LabelsConfig:                 # tools/pseudo_label.py's settings
    kmeans: int = 1000              # k-means clusters
    clusters: int = 0               # pseudo-speakers after AHC (0: the k-means clusters); AAM's method.classes
    iterations: int = 20
    workers: int = 4                # audio decoding threads
    crops: int = 0                  # embed the mean of N fixed crops (0: whole utterances; crops fill every batch)
    crop_seconds: float = 4.0

    def __post_init__(self) -> None:
        if self.kmeans < 1 or not 0 <= self.clusters <= self.kmeans or self.iterations < 1 or self.workers < 1:
            raise ValueError("labels: need kmeans >= 1, 0 <= clusters <= kmeans, iterations >= 1 and workers >= 1")
        if self.crops < 0 or self.crop_seconds <= 0:
            raise ValueError("labels: need crops >= 0 and crop_seconds > 0")


@dataclass
class EvaluateConfig:               # tools/evaluate.py's settings
    trials: list[str] = field(default_factory=list)  # trial lists `label enroll test`
    audio_root: str = ""            # folder the trial ids are relative to ...
    shards: str = ""                # ... or the shard set that holds them
    each_stage: bool = False        # also evaluate every model before the last, into RUN/<stage>/eval

    def __post_init__(self) -> None:
        if not self.trials:
            raise ValueError("evaluate.trials: give at least one trial list")
        if bool(self.audio_root) == bool(self.shards):
            raise ValueError("evaluate: give exactly one of audio_root and shards")


@dataclass
class ChainConfig:
    common: CommonConfig
    first: StageConfig
    rounds: RoundsConfig
    labels: LabelsConfig
    evaluate: EvaluateConfig


SECTIONS = {"common": CommonConfig, "first": StageConfig, "rounds": RoundsConfig, "labels": LabelsConfig,
            "evaluate": EvaluateConfig}


def load_chain(path: str, overrides: list[str] | None = None) -> ChainConfig:
    """A chain recipe (YAML) with `section.key=value` overrides, every key and type checked as in training recipes."""
    tree = apply_overrides(read_yaml(path), list(overrides or []), tuple(SECTIONS))
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: expected sections {', '.join(SECTIONS)}")
    for section in tree:
        if section not in SECTIONS:
            raise RecipeError(f"{section}: unknown section; valid sections: {', '.join(SECTIONS)}")
    return ChainConfig(**{name: build_section(cls, tree.get(name), name) for name, cls in SECTIONS.items()})


@dataclass
class Stage:
    name: str                       # stage0-ssl, round1, round2, ...
    folder: Path
    recipe: str
    overrides: list[str]            # the chain's and the recipe's, then the ones the chain sets
    steps: int
    labels: Path | None = None      # the pseudo-labels it trains on (rounds only)
    regrouped: Path | None = None   # the shard set regrouped by those labels (cross-utterance rounds only)

    @property
    def checkpoint(self) -> Path:
        return self.folder / "train" / "last.pt"


def plan(cfg: ChainConfig, run: Path) -> list[Stage]:
    """The stages in order, each stage's recipe loaded and checked now: a typo fails before any training."""
    stages = [_stage(cfg, cfg.first, "first", "stage0-ssl", run, None)]
    for k in range(1, cfg.rounds.count + 1):
        stages.append(_stage(cfg, cfg.rounds, "rounds", f"round{k}", run, run / f"round{k}" / "labels.npz",
                             stages[-1].checkpoint))
    return stages


def _stage(cfg: ChainConfig, stage: StageConfig, key: str, name: str, run: Path, labels: Path | None,
           previous: Path | None = None) -> Stage:
    if not stage.recipe:
        raise RecipeError(f"{key}.recipe: name the training recipe")
    if stage.epochs < 0:
        raise RecipeError(f"{key}.epochs: must be >= 0, got {stage.epochs}")
    folder = run / name
    overrides = [*cfg.common.overrides, *stage.overrides, f"data.train={cfg.common.shards}",
                 f"train.out_dir={folder / 'train'}"]
    if stage.epochs:
        overrides.append(f"train.epochs={stage.epochs}")
    if labels is not None:
        overrides.append(f"data.labels={labels}")
        if cfg.rounds.fine_tune:
            overrides.append(f"train.init={previous}")
    regrouped = None
    try:
        recipe = load_recipe(stage.recipe, overrides)
        if labels is not None and hasattr(recipe.method, "classes"):  # a method over classes (AAM)
            overrides.append(f"method.classes={cfg.labels.clusters or cfg.labels.kmeans}")
        if labels is not None and recipe.data.mode == "cross-utterance":  # pairs need each pseudo-speaker together
            # The regrouped set carries the labels as its groups (`label-<n>`, the names data.labels gives).
            regrouped = folder / "shards"
            overrides = [o for o in overrides if o != f"data.labels={labels}"] + [f"data.train={regrouped}"]
        recipe = load_recipe(stage.recipe, overrides)
    except RecipeError as e:
        raise RecipeError(f"{key}.recipe {stage.recipe}: {e}") from None
    return Stage(name, folder, stage.recipe, overrides, recipe.train.epochs * recipe.data.steps_per_epoch, labels,
                 regrouped)


def run_chain(cfg: ChainConfig, run: Path) -> dict:
    """Every stage in order, complete ones skipped; returns (and writes last) RUN/summary.json's content."""
    stages = plan(cfg, run)
    print(f"chain: {len(stages)} training stages, {sum(s.steps for s in stages)} steps in all, run folder {run}",
          flush=True)
    for previous, stage in zip([None, *stages], stages):
        if previous is not None:
            _step(f"{stage.name}: pseudo-labels from {previous.name}", stage.labels,
                  _pseudo_label(cfg, previous.checkpoint, stage))
        if stage.regrouped is not None:
            _step(f"{stage.name}: regroup the set by pseudo-speaker", stage.regrouped / MANIFEST,
                  [sys.executable, str(TOOLS / "make_shards.py"), "regroup", "--in", cfg.common.shards,
                   "--labels", str(stage.labels), "--out", str(stage.regrouped), "--resume"])
        _step(f"{stage.name}: train {stage.recipe} ({stage.steps} steps)", stage.checkpoint,
              _launch(cfg) + [str(TOOLS / "train.py"), "--config", stage.recipe, *stage.overrides])
        if stage is stages[-1] or cfg.evaluate.each_stage:
            out = _eval_dir(stage, stages, run)
            _step(f"{stage.name}: evaluate", out / "metrics.json", _evaluate(cfg, stage.checkpoint, out))
    report = summary(stages, run)
    storage.write_json(str(run / "summary.json"), report)  # atomic, and last: its presence means a finished chain
    print_summary(report)
    return report


def _launch(cfg: ChainConfig) -> list[str]:
    if cfg.common.nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.common.nproc}"]


def _pseudo_label(cfg: ChainConfig, checkpoint: Path, stage: Stage) -> list[str]:
    c = cfg.labels
    return _launch(cfg) + [str(TOOLS / "pseudo_label.py"), "--checkpoint", str(checkpoint), "--shards",
                           cfg.common.shards, "--out", str(stage.labels), "--work", str(stage.folder / "labels-work"),
                           "--kmeans", str(c.kmeans), "--clusters", str(c.clusters), "--iterations",
                           str(c.iterations), "--workers", str(c.workers), "--crops", str(c.crops),
                           "--crop-seconds", str(c.crop_seconds)]


def _evaluate(cfg: ChainConfig, checkpoint: Path, out: Path) -> list[str]:
    e = cfg.evaluate
    source = ["--audio-root", e.audio_root] if e.audio_root else ["--shards", e.shards]
    return [sys.executable, str(TOOLS / "evaluate.py"), "--checkpoint", str(checkpoint), "--trials", *e.trials,
            *source, "--out", str(out)]


def _eval_dir(stage: Stage, stages: list[Stage], run: Path) -> Path:
    return run / "eval" if stage is stages[-1] else stage.folder / "eval"


def _step(title: str, done: Path, cmd: list[str]) -> None:
    """Run one stage's command unless its output `done` exists; the chain's stop (SIGTERM, Ctrl-C) stops it too."""
    if done.exists():
        print(f"== {title}: skipped, {done} exists", flush=True)
        return
    print(f"== {title}\n$ {shlex.join(map(redact_override, cmd))}", flush=True)
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except BaseException:  # train.py saves a checkpoint on SIGTERM (torchrun passes it on), so the rerun resumes
        proc.terminate()
        proc.wait()
        raise
    if code:
        raise ChainError(f"{title}: exited with status {code}; rerun the same command to resume here")


def summary(stages: list[Stage], run: Path) -> dict:
    """Per stage: steps, the statistics of the labels it trained on, and the metrics of its evaluation."""
    rows = []
    for stage in stages:
        row = {"stage": stage.name, "steps": stage.steps, "labels": None, "eer": None}
        if stage.labels is not None:
            stats = read_labels(str(stage.labels)).info["statistics"]
            row["labels"] = {k: stats.get(k) for k in ("clusters", "nmi", "purity")}
        metrics = _eval_dir(stage, stages, run) / "metrics.json"
        if metrics.exists():  # each list's final scoring (AS-norm when configured)
            lists = json.loads(metrics.read_text())["lists"]
            row["eer"] = {name: list(m["scoring"].values())[-1]["eer"] for name, m in lists.items()}
        rows.append(row)
    return {"total_steps": sum(s.steps for s in stages), "stages": rows}


def print_summary(report: dict) -> None:
    lists = sorted({name for row in report["stages"] for name in row["eer"] or {}})
    print(f"\n{'stage':<12} {'steps':>6} {'clusters':>9} {'NMI':>6} {'purity':>7}"
          + "".join(f" {'EER % ' + name:>14}" for name in lists))
    for row in report["stages"]:
        labels, eer = row["labels"] or {}, row["eer"] or {}
        cells = [_cell(labels.get("clusters"), "d", 9), _cell(labels.get("nmi"), ".3f", 6),
                 _cell(labels.get("purity"), ".3f", 7)] + [_cell(100 * eer[n] if n in eer else None, ".2f", 14)
                                                            for n in lists]
        print(f"{row['stage']:<12} {row['steps']:>6} " + " ".join(cells))
    print(f"total training steps: {report['total_steps']}")


def _cell(value, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"
