"""Studies: a run repeated over seeds and over a grid of learning rates and LoRA ranks.

``--seeds 0,1,2`` repeats every run once per seed (the data partitions, the adapter's
initialisation and the batches all follow it); ``--lr-grid 1e-3,3e-3`` and
``--rank-grid 16,32`` run every value (each combination, for each strategy). In a TOML file
the same keys take lists, at the top or in a strategy's table (``[fedsb]
lr-grid = [1e-3, 1e-2]``). The rank grid is not ``--ranks``, FLoRA's per-client ranks.

A study's folder holds one run per (strategy, grid value, seed), as
``<name>/<strategy>/<value>/seed<k>/`` (a level only where it varies). Running the same
command again skips the finished runs and resumes an interrupted one from its checkpoint.

The two grids differ in what the summary makes of them. A rank is a design choice, traded
against bytes: each rank of ``--rank-grid`` is compared, as its own row and curve ("fedsb
rank32"). A learning rate is tuned: for each row, one value of ``--lr-grid`` is chosen on
the validation split (``--val-size``), which is disjoint from the evaluation split that
the summary reports.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedlora.config import RunConfig, comma_list
from fedlora.errors import FedLoraError

STUDY_KEYS = ("seeds", "lr-grid", "rank-grid")
GRID_FIELDS = {"lr-grid": "lr", "rank-grid": "rank"}  # grid key -> the RunConfig field it sets
# Settings a finished or interrupted run must share with the command that finds it.
RESUMABLE_CHANGES = {"name", "resume", "output"}


@dataclass(frozen=True)
class StudyRun:
    """One run of a study: its config and where it sits in the study."""

    config: RunConfig
    strategy: str
    settings: dict  # its grid value, e.g. {"lr": 0.001, "rank": 16}; {} without a grid
    seed: int
    folder: str  # the study's folder under --output (the run's is config.name)

    @property
    def study_dir(self) -> Path:
        """The study's folder: ``--output``/``folder``."""
        return Path(self.config.output) / self.folder

    @property
    def value(self) -> str:
        """Its grid value as its folder names it: ``lr0.001-rank16``, or ""."""
        return value_name(self.settings)

    @property
    def label(self) -> str:
        """The row it belongs to: the strategy, and its rank if ranks are compared."""
        return " ".join([self.strategy, *(["rank" + str(self.settings["rank"])]
                                          if "rank" in self.settings else [])])

    @property
    def tuned(self) -> str:
        """Its value of the tuned grid (``lr0.001``), or ""."""
        return value_name({k: v for k, v in self.settings.items() if k == "lr"})


def pop_study_keys(values: dict) -> dict:
    """Remove the study keys from ``values`` (flags or a TOML table) and return them."""
    return {key: values.pop(key) for key in STUDY_KEYS if key in values}


def parse_list(key: str, value, kind: type) -> list:
    """A study key's values: a TOML list or a comma-separated string, each of ``kind``."""
    items = comma_list(value) if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise FedLoraError(f"--{key} takes a comma-separated list, e.g. --{key} "
                           f"{'0,1,2' if kind is int else '1e-3,3e-3'}; got {value!r}")
    parsed = []
    for item in items:
        try:  # "3", 3 and 3.0 are the int 3; "3.5", 3.5 and true are no int
            number = kind(item)
            if isinstance(item, bool) or (kind is int and number != float(item)):
                raise ValueError
        except (TypeError, ValueError):
            raise FedLoraError(f"--{key} must list {kind.__name__}s, got {value!r}") from None
        parsed.append(number)
    if len(set(parsed)) < len(parsed):
        raise FedLoraError(f"--{key} names a value twice: {value!r}")
    return parsed


def value_name(settings: dict) -> str:
    """A grid value's folder name: ``lr0.001-rank16``."""
    return "-".join(f"{field}{value:g}" for field, value in settings.items())


def expand(base: dict, study: dict, strategy: str, name: str, multi: bool) -> list[StudyRun]:
    """The runs of one strategy: one per grid value and seed.

    ``base`` holds the merged run settings (dashed keys), ``study`` the strategy's study
    keys, ``name`` the folder under ``--output``; ``multi`` says whether the command runs
    more than one strategy (each then gets its own folder level).
    """
    from strategies import folder_name, resolved

    seeds = parse_list("seeds", study["seeds"], int) if "seeds" in study else None
    grids = {GRID_FIELDS[key]: parse_list(key, study[key], float if key == "lr-grid" else int)
             for key in GRID_FIELDS if key in study}
    if "rank" in grids and base.get("ranks"):
        raise FedLoraError(f"--rank-grid gives every client one rank, --ranks {base['ranks']} "
                           "gives each its own: keep one")
    runs = []
    values = [dict(zip(grids, combo)) for combo in itertools.product(*grids.values())]
    for settings, seed in itertools.product(values, seeds or [None]):
        parts = [name, folder_name(strategy)] if multi or seeds or grids else [name]
        if grids:
            parts.append(value_name(settings))
        if seeds is not None:
            parts.append(f"seed{seed}")
        merged = {**base, **settings, "strategy": strategy, "name": "/".join(parts)}
        if seed is not None:
            merged["seed"] = seed
        config = resolved(RunConfig.from_dict(merged))
        runs.append(StudyRun(config, strategy, settings, config.seed, name))
    tuned = len(grids.get("lr", []))
    if tuned > 1 and not runs[0].config.val_size:
        raise FedLoraError(f"--strategy {strategy}: a learning rate of --lr-grid's {tuned} is "
                           "chosen on a validation split; give --val-size N (e.g. 200), which "
                           "the server holds apart from the reported evaluation")
    return runs


def pending(runs: list[StudyRun]) -> list[RunConfig]:
    """What a command still has to run: one plain run is run (into a new folder); the runs
    of a study (several, or one with a study key) as :func:`to_do` says."""
    in_study = len(runs) > 1 or runs[0].config.name != runs[0].folder
    return to_do(runs) if in_study else [runs[0].config]


def to_do(runs: list[StudyRun]) -> list[RunConfig]:
    """The configs still to run: a finished run is skipped, an interrupted one resumes
    from its checkpoint, one that completed no round starts again. A run folder whose
    saved settings differ from the command's is refused (its figures would be mixed up
    with another study's)."""
    from server.outputs import CHECKPOINT, METRICS_FILE, is_finished, read_rows, run_dir
    from strategies import unread_settings

    pending = []
    for run in runs:
        folder = run_dir(run.config)
        saved = folder / "config.toml"
        if not saved.is_file():
            pending.append(run.config)
            continue
        # A setting newer than the saved run was at its default there; another method's
        # settings cannot change this run.
        before = {**RunConfig().to_dict(), **tomllib.loads(saved.read_text())}
        now = run.config.to_dict()
        ignored = RESUMABLE_CHANGES | {f.name.replace("_", "-") for f in unread_settings(run.config)}
        changed = [k for k in now if k not in ignored and before.get(k) != now[k]]
        if changed:
            key = changed[0]
            raise FedLoraError(f"{folder} was run with {key} = {before.get(key)!r}, this "
                               f"command gives {now[key]!r}: choose another --name")
        if is_finished(folder):
            continue
        rounds = [row["round"] for row in read_rows(folder)] if (folder / METRICS_FILE).is_file() else []
        if (folder / CHECKPOINT).is_file() and max(rounds, default=0) < run.config.rounds:
            pending.append(dataclasses.replace(run.config, resume=str(folder)))
        else:  # no round completed (or all did, and it stopped before its outputs): again
            shutil.rmtree(folder)
            pending.append(run.config)
    return pending
