"""YAML for configs, read with bounds: no anchors or aliases, a bounded nesting depth and size.

yaml.safe_load already refuses Python tags, but it expands aliases: nine anchors of nine copies each
make a 1.8 KB file that expands to ~400 million values (issue 26: 6.2 GB of memory and a 2 GB error
line). A config needs none of that (it is at most four levels deep and a few KB), so the loader
refuses anchors and aliases where they are written and bounds what it composes.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a config is a few KB; the largest preset is under 5 KB
MAX_DEPTH = 32  # a config is four levels deep (generation.instructions.max_new_tokens, warmup.betas)


class UnsafeYAML(yaml.YAMLError):
    """A document this loader refuses; `line` is 1-based (None where it is not known)."""

    def __init__(self, problem: str, line: int | None = None):
        super().__init__(problem)
        self.problem, self.line = problem, line


class _BoundedLoader(yaml.SafeLoader):
    """The pure-Python safe loader (the C one composes in C, out of reach of these checks)."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, yaml.AliasEvent):
            raise UnsafeYAML(f"alias *{event.anchor}: anchors and aliases are not accepted (write the value out)",
                             line)
        if getattr(event, "anchor", None) is not None:
            raise UnsafeYAML(f"anchor &{event.anchor}: anchors and aliases are not accepted (write the value out)",
                             line)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise UnsafeYAML(f"nested more than {MAX_DEPTH} levels deep", line)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load(text: str) -> Any:
    """One YAML document, composed within the bounds above (UnsafeYAML otherwise; other errors are
    yaml.YAMLError as from yaml.safe_load)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise UnsafeYAML(f"{size} bytes, over the limit of {MAX_BYTES} for a config")
    return yaml.load(text, Loader=_BoundedLoader)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value seen twice out twice, so what this package writes, `load` reads back."""

    def ignore_aliases(self, data):
        return True


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False)
