"""`montessori export RUN OUT --format F`: a run's generated pairs in the formats fine-tuning tools read.

Formats (one record per pair, instruction as the user turn, response as the assistant turn):

  messages  JSONL {"messages": [{role: user}, {role: assistant}], ...}: TRL's SFTTrainer (conversational),
            the chat-template loaders of axolotl (type chat_template) and LLaMA-Factory (openai/sharegpt)
  alpaca    JSONL {"instruction", "input": "", "output", ...}: Alpaca loaders (LLaMA-Factory alpaca, axolotl alpaca)
  sharegpt  JSONL {"conversations": [{from: human, value}, {from: gpt, value}], ...}: ShareGPT loaders
  hf        a `datasets` dataset directory (`save_to_disk`; messages shape): `datasets.load_from_disk(OUT)`;
            `--push-to-hub REPO` then uploads it with `Dataset.push_to_hub` (stored as Parquet on the Hub)
  parquet   one Parquet file (messages shape): pandas, polars, `load_dataset("parquet", data_files=OUT)`

Provenance columns on every record: id, round, stage (`dataset`: the training set written by the
DPO-updated teacher; `responses`: the probing round's pairs), split (warmup / probing for `responses`
pairs), teacher (the model spec that wrote it), influence (where measured, else null) and task_type
(montessori.analysis). Records are in a fixed order (round, stage, file order), so exporting the
same run twice gives byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from montessori.analysis import task_type
from montessori.errors import InputError
from montessori.generation.stage import run_dataset, run_responses
from montessori.influence.stage import run_influence
from montessori.influence.warmup import run_warmup
from montessori.store import RunStore, atomic_write_text, read_jsonl

FORMATS = ("messages", "alpaca", "sharegpt", "hf", "parquet")
# The stages whose pairs.jsonl is exported: the training set, then the probing candidates (which carry
# their influence and warm-up/probing split).
EXPORTED = (run_dataset, run_responses)
STAGES = tuple(fn.stage.name for fn in EXPORTED)
PROVENANCE = ("id", "round", "stage", "split", "teacher", "influence", "task_type")


def collect(run_dir: str | Path, stages: tuple[str, ...] = STAGES) -> list[dict]:
    """Every exported pair as {instruction, response, *PROVENANCE}, in export order."""
    store = RunStore(run_dir)
    if not store.root.is_dir() or not store.rounds():
        raise InputError(f"{run_dir}: not a run directory (no round-N folders)")
    rows = []
    for round_ in store.rounds():
        influence = {r["id"]: r["influence"] for r in read_jsonl(store.stage(round_, run_influence).path / "influence.jsonl")
                     if r.get("status") == "ok" and r.get("influence") is not None}
        split_file = store.stage(round_, run_warmup).path / "split.json"
        split = json.loads(split_file.read_text()) if split_file.exists() else {}
        split_of = {i: name for name in ("warmup", "probing") for i in split.get(name, [])}
        for stage in stages:
            sd = store.stage(round_, stage)
            measured = stage == run_responses.stage.name  # the probing candidates: split and influence
            teacher = (sd.manifest() or {}).get("teacher")
            for p in read_jsonl(sd.path / "pairs.jsonl"):
                if not p.get("response"):  # nothing to learn from an empty answer
                    continue
                rows.append({"instruction": p["instruction"], "response": p["response"], "id": p["id"],
                             "round": round_, "stage": stage,
                             "split": split_of.get(p["id"]) if measured else None,
                             "teacher": teacher, "influence": influence.get(p["id"]) if measured else None,
                             "task_type": task_type(p["instruction"])})
    if not rows:
        raise InputError(f"{run_dir}: no generated pairs to export in stages {', '.join(stages)} "
                         f"(run the responses or dataset stage first)")
    return rows


def shape(row: dict, fmt: str) -> dict:
    provenance = {k: row[k] for k in PROVENANCE}
    if fmt == "alpaca":
        return {"instruction": row["instruction"], "input": "", "output": row["response"]} | provenance
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": row["instruction"]},
                                  {"from": "gpt", "value": row["response"]}]} | provenance
    return {"messages": [{"role": "user", "content": row["instruction"]},
                         {"role": "assistant", "content": row["response"]}]} | provenance


def _dataset(records: list[dict]):
    import datasets
    datasets.disable_progress_bars()
    # Explicit types: a column that is null in every row (influence of a dataset-only export) stays float.
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "id": datasets.Value("string"), "round": datasets.Value("int64"), "stage": datasets.Value("string"),
        "split": datasets.Value("string"), "teacher": datasets.Value("string"),
        "influence": datasets.Value("float64"), "task_type": datasets.Value("string")})
    return datasets.Dataset.from_list(records, features=features)


def export(run_dir: str | Path, out: str | Path, fmt: str, *, stages: tuple[str, ...] = STAGES,
           push_to_hub: str | None = None, private: bool = False) -> tuple[Path, int]:
    """Write the run's pairs to `out` in format `fmt`; returns (path, records)."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if push_to_hub and fmt != "hf":
        raise InputError("--push-to-hub needs --format hf")
    records = [shape(r, fmt) for r in collect(run_dir, stages)]
    out = Path(out)
    if fmt in ("messages", "alpaca", "sharegpt"):
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    elif fmt == "parquet":
        out.parent.mkdir(parents=True, exist_ok=True)
        _dataset(records).to_parquet(str(out))
    else:
        if out.exists():  # replace an earlier export, never anything else
            if not (out / "dataset_info.json").exists():
                raise InputError(f"{out}: exists and is not a dataset directory (choose a new OUT)")
            shutil.rmtree(out)
        dataset = _dataset(records)
        dataset.save_to_disk(str(out))
        if push_to_hub:  # needs a Hub token (HF_TOKEN or `hf auth login`)
            dataset.push_to_hub(push_to_hub, private=private)
    return out, len(records)


def cmd_export(args) -> int:
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise InputError(f"--stages {args.stages}: choose from {', '.join(STAGES)}")
    path, n = export(args.run_dir, args.out, args.format, stages=stages, push_to_hub=args.push_to_hub,
                     private=args.private)
    where = f"; pushed to {args.push_to_hub}" if args.push_to_hub else ""
    print(f"exported {n} pairs ({args.format}) to {path}{where}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run's generated pairs as messages / alpaca / sharegpt JSONL, "
                       "a datasets directory (hf) or Parquet")
    p.add_argument("run_dir")
    p.add_argument("out", help="output file (JSONL, Parquet) or directory (hf)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--stages", default=",".join(STAGES),
                   help="which pairs: dataset (the training set of the updated teacher), responses (probing round); "
                        "default both")
    p.add_argument("--push-to-hub", metavar="REPO", help="with --format hf: upload to this Hub dataset repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.set_defaults(func=cmd_export)
