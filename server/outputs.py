"""A run's folder, ``<output>/<name>/``: what the server writes there and reads back.

- ``config.toml``: the resolved run config, written when the run starts (or resumes), with
  a ``[provenance]`` table: the code that ran it (:func:`provenance`);
- ``metrics.jsonl``: one JSON row per round, written as each round ends, with the table
  row printed for it (:class:`MetricsLog`);
- ``checkpoint.pt``: the state after the last completed round (``--resume`` continues
  from it);
- ``adapter/``, ``report.png`` and, last, ``summary.json``: how the run ended.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import subprocess
import tomllib
from datetime import datetime
from pathlib import Path

import tomli_w
import torch
from flwr.app import ArrayRecord
from tqdm import tqdm

from fedlora.adapters import save_adapter, save_base_delta, save_shared_tensors
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.evaluate import metric_columns
from strategies import folder_name

METRICS_FILE = "metrics.jsonl"  # one JSON row per round
SUMMARY = "summary.json"  # how the run ended, written last
CHECKPOINT = "checkpoint.pt"  # the state after the last completed round
PROVENANCE = "provenance"  # config.toml's table, summary.json's key: the code that ran it

# The round table: (metrics key, heading, width, format spec); the evaluation's columns come
# from fedlora.evaluate.METRICS, after the training loss.
HEAD = [("round", "round", 5, "d"), ("train_loss", "train loss", 10, ".4f")]
TAIL = [
    ("bytes_up", "bytes up", 13, ","),
    ("bytes_down", "bytes down", 13, ","),
    ("epsilon", "epsilon", 7, ".3g"),  # these two only with --dp
    ("delta", "delta", 7, ".0e"),
    ("seconds", "seconds", 7, ".1f"),
]


def run_dir(config: RunConfig) -> Path:
    """The run's folder: the ``--resume`` folder, else ``<output>/<name>`` (a run without
    ``--name`` gets its name in :func:`make_run_dir`; the commands always give one)."""
    return Path(config.resume) if config.resume else Path(config.output) / config.name


def make_run_dir(config: RunConfig) -> Path:
    """Create the run's folder (named after the strategy and the time when ``--name`` is
    not given) and write the resolved config into it."""
    if not config.resume and not config.name:
        config = dataclasses.replace(config, name=default_name(config.strategy))
    folder = run_dir(config)
    if config.resume:
        if not (folder / CHECKPOINT).is_file():
            raise FedLoraError(f"--resume {folder}: no {CHECKPOINT} there, so no completed round to resume")
    else:
        check_unused(folder)
    folder.mkdir(parents=True, exist_ok=True)
    code = provenance()
    if config.resume:  # the code of the rounds before, where it was other code
        before = saved_provenance(folder)
        parts = before.get("earlier", [])
        if (before.get("commit"), before.get("code_changed")) != (code["commit"], code.get("code_changed")):
            parts = [*parts, f"{before.get('commit', 'unknown')}"
                             + (" with changes" if before.get("code_changed") else "")]
        if parts:
            code["earlier"] = parts
    resolved = {**config.to_dict(), "name": config.name or folder.name, "resume": "",
                PROVENANCE: code}
    (folder / "config.toml").write_text(tomli_w.dumps(resolved))
    return folder


def provenance() -> dict:
    """What produced a run: the git commit of this code and whether its Python files or
    pyproject.toml differed from that commit (``code_changed``); the versions of the
    packages its figures depend on; this machine's architecture and the instruction set
    torch's CPU kernels use (``cpu``). Packages and CPU change the float rounding: a run
    repeats to the last digit only where all of these match. The commit is "unknown" where
    the code is no git checkout (an installed wheel; Flower's app bundle under ``flwr
    run``, where ``fedlora.deploy`` records its own checkout's instead)."""
    root = Path(__file__).resolve().parents[1]
    code: dict = {"commit": "unknown"}
    try:
        head = git(root, "rev-parse", "HEAD")
        changed = git(root, "status", "--porcelain", "--", "*.py", "pyproject.toml")
        code = {"commit": head.strip(), "code_changed": bool(changed.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    for package in ("fedlora", "torch", "transformers", "peft", "flwr", "opacus"):
        try:
            code[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            code[package] = "not installed"
    code["cpu"] = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return code


def git(root: Path, *command: str) -> str:
    """The output of ``git -C root COMMAND``; CalledProcessError where git fails."""
    return subprocess.run(["git", "-C", str(root), *command], capture_output=True, text=True,
                          timeout=30, check=True).stdout


def adopt_provenance(folder: Path, code: dict) -> None:
    """Record ``code`` as the run's provenance where the server could not tell its own
    (commit "unknown": ``flwr run`` serves the app from a bundle of the checkout that
    ``fedlora.deploy`` submitted, and that knows its commit)."""
    if saved_provenance(folder).get("commit") != "unknown":
        return
    config = tomllib.loads((folder / "config.toml").read_text())
    (folder / "config.toml").write_text(tomli_w.dumps({**config, PROVENANCE: code}))
    if (folder / SUMMARY).is_file():
        summary = json.loads((folder / SUMMARY).read_text())
        (folder / SUMMARY).write_text(json.dumps({**summary, PROVENANCE: code}, indent=1) + "\n")


def saved_provenance(folder: Path) -> dict:
    """The ``[provenance]`` table of a run folder's config.toml ({} where it has none)."""
    saved = folder / "config.toml"
    return tomllib.loads(saved.read_text()).get(PROVENANCE, {}) if saved.is_file() else {}


def default_name(strategy: str) -> str:
    """A run folder's name when ``--name`` is not given: the strategy (or ``a,b`` of a
    comparison: ``a-b``) and the time."""
    return f"{folder_name(strategy)}-{datetime.now():%Y%m%d-%H%M%S}"


def check_unused(folder: Path) -> None:
    """Raise FedLoraError if ``folder`` already holds a run."""
    if (folder / METRICS_FILE).exists():
        raise FedLoraError(f"run folder {folder} already holds a run; choose another --name "
                           f"or continue it with --resume {folder}")


def read_rows(folder: Path) -> list[dict]:
    """The rows of a run folder's metrics.jsonl, round 0 first."""
    return [json.loads(line) for line in (folder / METRICS_FILE).open()]


def is_finished(folder: Path) -> bool:
    """Whether the run in ``folder`` ended: SUMMARY is the last file a run writes (and
    with config.toml and metrics.jsonl, all a committed study keeps of it)."""
    return (folder / SUMMARY).is_file()


def save_checkpoint(folder: Path, server_round: int, arrays: ArrayRecord, strategy,
                    row: dict | None = None) -> None:
    """Save what the next round needs, replacing the previous round's checkpoint whole;
    ``row``: the round's metrics row before its evaluation, which a resumed run completes
    if the run stopped before writing it."""
    checkpoint = {"round": server_round, "arrays": arrays.to_torch_state_dict(),
                  "strategy": strategy.state_dict(), "row": row}
    partial = folder / f"{CHECKPOINT}.partial"
    torch.save(checkpoint, partial)
    partial.replace(folder / CHECKPOINT)  # atomic: a crash leaves the old one or the new one


def load_checkpoint(folder: Path, strategy, metrics_log: MetricsLog, rounds: int):
    """Restore the strategy and the metrics of the last completed round; return the global
    arrays, that round and its row if metrics.jsonl lacks it (the run stopped between the
    checkpoint and the row: while it evaluated), else None."""
    checkpoint = torch.load(folder / CHECKPOINT, weights_only=True)  # tensors and plain values
    done = checkpoint["round"]
    rows = [row for row in read_rows(folder) if row["round"] <= done]
    unfinished = checkpoint.get("row") if done not in {row["round"] for row in rows} else None
    if done >= rounds and unfinished is None:
        raise FedLoraError(f"--resume {folder}: all {done} rounds are done; give --rounds above "
                           f"{done} to continue")
    strategy.load_state_dict(checkpoint["strategy"])
    metrics_log.restore(rows)
    tqdm.write(f"resuming {folder} after round {done}")
    return ArrayRecord(checkpoint["arrays"]), done, unfinished


def save_outputs(folder: Path, config: RunConfig, strategy, arrays: ArrayRecord,
                 evaluation, rows: list[dict], ended: str) -> None:
    """The run's adapter and its model card, report.png and, last, summary.json.
    ``evaluation`` (server.evaluation.Evaluation) yields the global model."""
    if strategy.personal:  # no global model: the shared tensors, and what is missing
        save_shared_tensors(arrays.to_torch_state_dict(), folder / "adapter", strategy.personal)
    else:
        with evaluation.global_adapter(arrays) as adapted:
            save_adapter(adapted, folder / "adapter")
        if strategy.kept.base_delta:  # the global model is not the base model plus a LoRA
            save_base_delta(strategy.kept.base_delta, folder / "adapter")
        adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        (folder / "adapter" / "README.md").write_text(model_card(
            config, rows, adapter, bool(strategy.kept.base_delta),
            bool(evaluation.tokenizer.chat_template)))
    from server.report import plot_report  # matplotlib: only once a report is written

    plot_report(rows, folder / "report.png")
    last = rows[-1]
    (folder / SUMMARY).write_text(json.dumps({  # written last: the run has ended
        "ended": ended, "rounds": last["round"], PROVENANCE: saved_provenance(folder),
        "cumulative_bytes_up": last["cumulative_bytes_up"],
        "cumulative_bytes_down": last["cumulative_bytes_down"],
        "seconds": sum(row["seconds"] for row in rows)}, indent=1) + "\n")


def model_card(config: RunConfig, rows: list[dict], adapter: dict, base_delta: bool,
               chat_template: bool) -> str:
    """The saved adapter's README: what it is (base model, method, rank and modules, data
    and how its examples were rendered, the federation), how it scored, its privacy
    guarantee if any, and how to load it."""
    from fedlora.data import PROMPT_TEMPLATE

    last = rows[-1]
    scored = next((r for r in reversed(rows) if any(k in r for k, *_ in metric_columns())), None)
    figures = [f"{key} {scored[key]:.4g}" for key, *_ in metric_columns()
               if scored and isinstance(scored.get(key), (int, float))]
    template = ("the model's chat template" if chat_template
                else "fedlora's plain chat template (fedlora.prompts.PLAIN_TEMPLATE)")
    single = (f"through {template}" if config.chat_template
              else f"as the plain prompt `{PROMPT_TEMPLATE!r}` and its answer")
    data = (f"one file per client ({config.client_data})" if config.client_data
            else f"{config.dataset}, partitioned over the clients ({config.partitioning})")
    privacy = ("none: no differential-privacy guarantee" if config.dp == "off" else
               f"--dp {config.dp}: epsilon {last.get('epsilon', float('nan')):.4g} at delta "
               f"{last.get('delta', float('nan')):.3g} after round {last['round']} (the "
               "assumptions are in docs/privacy.md)")
    load = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({adapter['base_model_name_or_path']!r})\n")
    if base_delta:
        load += ("from fedlora.adapters import apply_base_delta\n"
                 "base = apply_base_delta(base, 'adapter')  # add base_delta.safetensors first\n")
    load += "model = PeftModel.from_pretrained(base, 'adapter')\n"
    return "\n".join([
        "---", f"base_model: {config.model}", "library_name: peft",
        f"tags: [lora, federated-learning, fedlora, {config.strategy}]", "---", "",
        f"# {config.name or 'fedlora run'}: a LoRA adapter trained by federated learning", "",
        f"- **Base model**: `{config.model}` (`{adapter['base_model_name_or_path']}`)",
        f"- **Method**: {config.strategy}; rounds: {last['round']}; clients: {config.num_clients}, "
        f"a fraction {config.fraction_train:g} of them training each round; seed {config.seed}",
        f"- **LoRA**: rank {adapter['r']}, alpha {adapter['lora_alpha']:g}, modules "
        f"{', '.join(sorted(adapter['target_modules']))}"
        + (" (the base weights changed too: base_delta.safetensors)" if base_delta else ""),
        f"- **Data**: {data}; format {config.data_format}; conversations rendered with "
        f"{template}, every assistant turn trained; classification and prompt/response "
        f"examples {single}; at most {config.max_length} tokens",
        f"- **Evaluation** (round {scored['round'] if scored else '-'}): "
        + (", ".join(figures) if figures else "none"),
        f"- **Privacy**: {privacy}",
        "", "## Load it", "", "```python", load + "```", "",
        "Written by fedlora; the run's config.toml, metrics.jsonl and summary.json sit beside "
        "this folder.", ""])


class MetricsLog:
    """metrics.jsonl, one JSON object per round, and the table row printed for it."""

    def __init__(self, path: Path, private: bool = False, central: bool = True,
                 federated: bool = False, labelled: bool = True, validated: bool = False) -> None:
        self.path = path
        self.rows: list[dict] = []
        self.total_up = self.total_down = 0
        shown = {"eval_": central, "val_": validated, "fed_eval_": federated}
        task = "labels" if labelled else "generation"
        self.columns = HEAD + [(key, *column) for key, prefix, metric, column in metric_columns()
                               if shown[prefix] and metric.task in ("any", task)]
        self.columns += [c for c in TAIL if private or c[0] not in ("epsilon", "delta")]
        tqdm.write("  ".join(f"{heading:>{width}}" for _, heading, width, _ in self.columns))

    def restore(self, rows: list[dict]) -> None:
        """Start over from ``rows`` (a resumed run drops rounds after its checkpoint)."""
        self.path.write_text("")
        self.rows, self.total_up, self.total_down = [], 0, 0
        for row in rows:
            self.write(row)

    def write(self, row: dict) -> None:
        self.total_up += row["bytes_up"]
        self.total_down += row["bytes_down"]
        row.update(cumulative_bytes_up=self.total_up, cumulative_bytes_down=self.total_down)
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write("  ".join(
            f"{'-' if row.get(key) is None else format(row[key], spec):>{width}}"
            for key, _, width, spec in self.columns
        ))
