"""Shared by the sweep benchmarks: run one simulation config under several sets of flags."""

from __future__ import annotations

from pathlib import Path

from fedlora.cli import build_parser, study_from_args
from fedlora.simulate import main as simulate_main
from server.outputs import is_finished, run_dir


def run_variants(config: str, variants: list[tuple[str, list[str]]], name: str, output: str,
                 seeds: str = "") -> dict[str, list[Path]]:
    """Run ``config`` once per (variant, flags) into <output>/<name>/<variant>/, or, with
    ``seeds`` ("0,1,2"), once per seed as a study of each variant
    (<variant>/<strategy>/seed<k>/). Finished runs are kept, so that an interrupted sweep
    resumes. Returns each variant's run folders."""
    folders = {}
    for variant, flags in variants:
        argv = ["--config", config, "--output", output, "--name", f"{name}/{variant}", *flags,
                *(["--seeds", seeds] if seeds else [])]
        runs = study_from_args(vars(build_parser().parse_args(argv)))
        folders[variant] = [run_dir(run.config) for run in runs]
        if not all(is_finished(folder) for folder in folders[variant]):
            print(f"\n== {variant} ==", flush=True)
            code = simulate_main(argv)
            if code != 0:
                raise SystemExit(code)
    return folders
