"""A stage's fingerprint: what its output depends on, so the runner knows when it is up to date.

The values of the config keys the stage declares (`@stage(keys=...)`), the content of the input files
it declares (`files`), and the fingerprints of the stages whose output it reads (`inputs`, and
`round_inputs` of the previous round). Equal fingerprint, same output: the stage is skipped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from montessori.config import Config
from montessori.context import Stage, StageContext
from montessori.errors import InputError
from montessori.store import StageDir, file_hash

FINGERPRINT_FILE = ".fingerprint"
FINGERPRINT_RULE = 2  # 2: declared keys + input files by content (1: whole config sections)


def fingerprint(config: Config, stage: Stage, ctx: StageContext, active: tuple[str, ...],
                file_hashes: dict[str, str | None]) -> tuple[str, dict]:
    """(fingerprint, what went into it). `file_hashes` caches file hashes across the stages of a run."""
    inputs = {}
    for name in stage.inputs:
        if name in active:
            inputs[f"round-{ctx.round}/{name}"] = _done_fingerprint(ctx.input(name), stage, name)
    if ctx.round > 1:
        for name in stage.round_inputs:
            if name in active:
                inputs[f"round-{ctx.round - 1}/{name}"] = _done_fingerprint(ctx.input(name, ctx.round - 1), stage, name)
    for key in stage.files:
        if key not in file_hashes:
            file_hashes[key] = input_file_hash(config, key)
        if file_hashes[key] is not None:
            inputs[f"file:{key}"] = file_hashes[key]
    config_hash = hashlib.sha256(json.dumps(config.keys_dump(stage.keys), sort_keys=True).encode()).hexdigest()[:16]
    payload = json.dumps({"rule": FINGERPRINT_RULE, "config": config_hash, "inputs": inputs, "round": ctx.round},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16], inputs | {"config": config_hash}


def input_file_hash(config: Config, key: str) -> str | None:
    """Content hash of the file (or folder) a key names; None for an unset key or a Hub dataset id."""
    from montessori.readers import BUILTIN, builtin_path
    value = config.value(key)
    if value is None:
        return None
    if value == BUILTIN:
        return file_hash(builtin_path("seeds.jsonl" if key == "data.seeds" else "reference.jsonl"))
    path = Path(value).expanduser()
    return file_hash(path) if path.exists() else None


def _done_fingerprint(stage_dir: StageDir, stage: Stage, name: str) -> str:
    manifest = stage_dir.manifest()
    if manifest is None:
        raise not_run(stage, stage_dir, name)
    return manifest["fingerprint"]


def not_run(stage: Stage, needed: StageDir, name: str) -> InputError:
    return InputError(f"stage '{stage.name}' needs stage '{name}' of round {needed.round}, which has not run: "
                      f"run with --until {name if needed.round == 1 else f'{needed.round}:{name}'} first")
