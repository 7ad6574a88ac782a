"""Peak memory and time per step of the `dpo` stage's training, on a run's real preference pairs.

The stage's own code path (training.common.load_for_training, training.dpo.build_dpo_trainer: TRL's
DPOTrainer, LoRA from the run's config, the reference log-probs precomputed before the first step),
the run's config with --set overrides, the first --steps optimizer steps' worth of its pairs. Resident
memory is sampled every 50 ms in a thread, so the peak is attributed to a phase: loading the teacher,
the reference pass, the training steps.

    montessori run RUN/config.yaml --until preferences          # a run to read pairs from
    python bench/dpo_memory.py RUN --steps 2 --out bench/results/dpo-memory-micro2.json
    python bench/dpo_memory.py RUN --steps 2 --set dpo.micro_batch_size=1 dpo.gradient_checkpointing=true
    python bench/dpo_memory.py RUN --reference-only --reference-batch 16     # the whole reference pass

One configuration per process: a process's peak is what it measures. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


class RSS:
    """Resident set size sampled in a thread; peak per named phase (GiB)."""

    def __init__(self, every: float = 0.05):
        self.phase, self.peaks, self.every = "start", {}, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), self.now())

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 2) for k, v in self.peaks.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory whose round-1 preferences stage is done")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (dpo.micro_batch_size=1 ...)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps to time")
    parser.add_argument("--reference-only", action="store_true",
                        help="all of the run's pairs through the reference pass, no training step")
    parser.add_argument("--reference-batch", type=int,
                        help="pairs per reference forward instead of training.dpo.reference_batch_size's")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    rss = RSS()
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    from montessori.config import load_config
    from montessori.preferences.stage import run_preferences
    from montessori.records import PreferencePair
    from montessori.store import RunStore, read_jsonl
    from montessori.training.common import load_for_training
    from montessori.training import dpo
    from montessori.training.dpo import build_dpo_trainer, preference_features
    if args.reference_batch:
        dpo.reference_batch_size = lambda model, cfg: args.reference_batch  # read by build_dpo_trainer

    cfg = load_config(args.run / "config.yaml", args.set)
    prefs = read_jsonl(RunStore(args.run).stage(1, run_preferences).path / "preferences.jsonl", PreferencePair)
    if not args.reference_only:
        prefs = prefs[:args.steps * cfg.dpo.global_batch_size]

    rss.phase = "load"
    started = time.perf_counter()
    model, tokenizer, compute = load_for_training(cfg.models.teacher, cfg.models, cfg.dpo.lora)
    loaded = time.perf_counter()

    steps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_begin(self, *a, **k):
            rss.phase = "steps"

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t)
            self.t = time.perf_counter()

    feats = [preference_features(tokenizer, p) for p in prefs]
    lengths = [len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) for f in feats]
    rss.phase = "reference pass"
    with tempfile.TemporaryDirectory() as work:
        trainer = build_dpo_trainer(model, tokenizer, prefs, cfg.dpo, output_dir=Path(work), compute_dtype=compute,
                                    ref_model=None if cfg.dpo.lora else
                                    load_for_training(cfg.models.teacher, cfg.models, False)[0].eval(),
                                    callbacks=[Clock()])
        built = time.perf_counter()
        reference_batch = trainer.args.precompute_ref_batch_size
        if not args.reference_only:
            trainer.train()  # TRL's reference pass runs first, inside train(), before on_step_begin
        done = time.perf_counter()
    peaks = rss.stop()
    result = {
        "bench": "dpo_memory", "run": str(args.run), "set": args.set, "teacher": cfg.models.teacher,
        "lora": cfg.dpo.lora, "global_batch_size": cfg.dpo.global_batch_size,
        "micro_batch_size": cfg.dpo.micro_batch_size,
        "reference_batch_size": reference_batch, "gradient_checkpointing": cfg.dpo.gradient_checkpointing,
        "pairs": len(prefs), "pair_tokens_max": max(lengths), "pair_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "load_s": round(loaded - started, 1), "build_s": round(built - loaded, 1),
        "train_s": round(done - built, 1), "step_s": [round(s, 1) for s in steps],
        "peak_rss_gib": peaks, "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
