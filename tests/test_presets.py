"""The GPU presets on tiny random models of their architectures (presets.tiny_overrides), end to end
through the CLI: what `montessori init DIR --preset NAME` writes runs, every stage, with the preset's
own choices (qwen-gemma: a Qwen2 teacher trained by DPO with LoRA adapters, a Gemma-3 base student with
the plain template, four answers per probing instruction as in the experiment's montessori-n4 arm)."""

import json

from montessori.cli import main
from montessori.config import load_config
from montessori.presets import tiny_overrides
from montessori.store import read_jsonl


def test_qwen_gemma_preset_inits_and_runs_on_tiny_models(tmp_path):
    run = tmp_path / "qwen-gemma"
    assert main(["init", str(run), "--preset", "qwen-gemma"]) == 0
    written = load_config(run / "config.yaml")
    assert (written.models.teacher, written.models.student) == ("qwen2.5-coder-1.5b", "gemma3-270m")
    assert written.dpo.lora
    assert main(["run", str(run / "config.yaml"), *tiny_overrides("qwen-gemma"), "generation.responses.n=2"]) == 0
    r1 = run / "round-1"
    done = sorted(p.name for p in r1.iterdir() if (p / "manifest.json").exists())
    assert done == sorted(["instructions", "responses", "warmup", "influence", "preferences", "dpo", "mechanism",
                           "dataset", "sft", "eval"])
    # The teacher that DPO trained is a Qwen2 (LoRA merged into plain weights), the student a Gemma-3.
    assert json.loads((r1 / "dpo" / "model" / "config.json").read_text())["model_type"] == "qwen2"
    assert "adapter_config.json" not in {p.name for p in (r1 / "dpo" / "model").iterdir()}
    assert json.loads((r1 / "sft" / "model" / "config.json").read_text())["model_type"] == "gemma3_text"
    pairs = read_jsonl(r1 / "responses" / "pairs.jsonl")
    assert len(pairs) == 2 * len({p["candidate_id"] for p in pairs})  # two answers per instruction
    results = json.loads((r1 / "eval" / "results.json").read_text())
    assert {m["student"] for m in results["metrics"]} == {"base", "trained"}
