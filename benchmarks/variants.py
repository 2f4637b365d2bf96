"""Shared by the sweep benchmarks: run one simulation config under several sets of flags."""

from __future__ import annotations

from pathlib import Path

from fedlora.simulate import main as simulate_main


def run_variants(config: str, variants: list[tuple[str, list[str]]], name: str, output: str) -> list[Path]:
    """Run ``config`` once per (variant, flags) into <output>/<name>/<variant>/; a run
    that already finished there is kept, so that an interrupted sweep resumes."""
    run_dirs = []
    for variant, flags in variants:
        run_dir = Path(output) / name / variant
        if not (run_dir / "adapter").exists():
            print(f"\n== {variant} ==", flush=True)
            code = simulate_main(["--config", config, "--output", output,
                                  "--name", f"{name}/{variant}", *flags])
            if code != 0:
                raise SystemExit(code)
        run_dirs.append(run_dir)
    return run_dirs
