"""Logging for the commands: one setup, shared by `montessori` (montessori.cli) and the `eval` /
`compare` commands (montessori.evaluation.cli), so neither command module imports the other."""

from __future__ import annotations

import logging
from pathlib import Path


def setup_logging(run_dir: Path | None, verbose: bool = False) -> None:
    from rich.logging import RichHandler
    root = logging.getLogger("montessori")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.handlers.clear()
    root.addHandler(RichHandler(show_path=False, show_time=False, markup=False, level=root.level))
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "montessori.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    for noisy in ("transformers", "datasets", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
