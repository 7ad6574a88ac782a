"""No module imports one from a layer above it: the package reads from the bottom up.

The layers, bottom to top, and why each sits where it does (read from what the modules import):

0. foundation: the errors, the typed records, the config schema, the run store, the input readers,
   what a stage and its context are (`context`), the config key groups stages declare (`keys`), a
   stage's fingerprint (`fingerprints`), the report's section type (`sections`), logging
   (`logs`), version bridges (`compat`) and the package root (`__version__`, `load_config`). They
   import nothing but each other, so every other layer can use them.
1. models: loading a model spec, chat templates, batching and the response-token loss. Every stage
   trains or runs a model through them; they know no stage.
2. stages: generation, influence, preferences, training, evaluation, and `features` (the kind of a
   measured candidate, which generation's steering, analysis and export share). A stage is a function
   of its config and the run store; stages may use each other's parts (the influence stage grades
   with evaluation's judge, the mechanism stage generates with generation's stage), never the runner.
3. runner: `method` (the stages of a round, in order), `preflight` (what they read, checked first),
   `pipeline` (rounds, re-run decisions, status) and `executors` (where a stage runs). They call
   stages; a stage does not know who runs it (tests/test_import_cycles.py also keeps the executors
   private to the pipeline).
4. views of a run for a person: `analysis`, `report`, `export`, `tasks` (`init --tasks`, and `teacher`,
   its choice of the strongest teacher within reach) and the
   `eval` / `compare` commands. They read run directories and the runner's stage status
   (`report` -> `pipeline.stage_status`); nothing below reads them.
5. the `montessori` command (`cli`), which knows every command.

A module's layer is that of the longest entry naming it or a package above it. The check reads the
import graph of tests/test_import_cycles.py (module-level and function-level imports, from the source).
"""

from __future__ import annotations

import pytest

from test_import_cycles import import_graph

LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("foundation", frozenset({"montessori", "montessori.errors", "montessori.records", "montessori.config",
                              "montessori.store", "montessori.readers", "montessori.context", "montessori.sections",
                              "montessori.logs", "montessori.compat", "montessori.resources",
                              "montessori.presets", "montessori.safe_yaml",
                              "montessori.keys", "montessori.fingerprints"})),
    ("models", frozenset({"montessori.models"})),
    ("stages", frozenset({"montessori.generation", "montessori.influence", "montessori.preferences",
                          "montessori.training", "montessori.evaluation", "montessori.features"})),
    ("runner", frozenset({"montessori.method", "montessori.preflight", "montessori.pipeline",
                          "montessori.executors"})),
    ("views", frozenset({"montessori.analysis", "montessori.verdict", "montessori.report", "montessori.export",
                         "montessori.tasks", "montessori.teacher",
                         "montessori.evaluation.cli"})),
    ("cli", frozenset({"montessori.cli"})),
)


def layer_of(module: str, layers=LAYERS) -> int | None:
    """Index of the layer of the longest entry equal to `module` or a package above it (the package
    root `montessori` only by name: it is not above everything)."""
    best, best_len = None, -1
    for i, (_, entries) in enumerate(layers):
        for entry in entries:
            covers = module == entry or (entry != "montessori" and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = i, len(entry)
    return best


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """'a (layer) -> b (layer)' for every import of a module from a higher layer."""
    names = [name for name, _ in layers]
    out = []
    for module in sorted(graph):
        for target in sorted(graph[module]):
            lo, hi = layer_of(module, layers), layer_of(target, layers)
            if lo is not None and hi is not None and hi > lo:
                out.append(f"{module} ({names[lo]}) -> {target} ({names[hi]})")
    return out


def test_every_module_has_a_layer():
    # A new module is placed in LAYERS on purpose, not by default.
    unplaced = sorted(m for m in import_graph() if layer_of(m) is None)
    assert unplaced == [], f"modules with no layer in tests/test_layers.py: {unplaced}"


def test_every_entry_names_a_module():
    # An entry left behind by a move or a rename would place nothing and hide a typo.
    modules = set(import_graph())
    stale = sorted(e for _, entries in LAYERS for e in entries
                   if not any(m == e or m.startswith(e + ".") for m in modules))
    assert stale == [], f"LAYERS entries naming no module: {stale}"


def test_the_check_sees_an_import_from_above_and_allows_one_from_below():
    graph = {"montessori.generation.stage": {"montessori.analysis", "montessori.store"},
             "montessori.evaluation.cli": {"montessori.cli", "montessori.evaluation.evaluate"},
             "montessori.evaluation.evaluate": {"montessori.models.load"},
             "montessori.store": {"montessori"}}
    assert upward_imports(graph) == [
        "montessori.evaluation.cli (views) -> montessori.cli (cli)",
        "montessori.generation.stage (stages) -> montessori.analysis (views)"]
    # the longest entry wins: evaluation.cli is a view, evaluation.evaluate a stage
    assert layer_of("montessori.evaluation.cli") == 4 and layer_of("montessori.evaluation.evaluate") == 2
    assert layer_of("montessori.evaluation") == 2 and layer_of("montessori") == 0
    assert layer_of("montessorix") is None


@pytest.mark.parametrize("module, layer", [("montessori.generation.stage", "stages"),
                                           ("montessori.influence.core", "stages"),
                                           ("montessori.models.batching", "models"),
                                           ("montessori.executors.launcher", "runner"),
                                           ("montessori.cli", "cli")])
def test_known_modules_sit_in_their_layer(module, layer):
    assert LAYERS[layer_of(module)][0] == layer


def test_no_module_imports_from_a_layer_above_it():
    found = upward_imports(import_graph())
    assert found == [], "imports from a layer above:\n  " + "\n  ".join(found)
