"""What the experiment scripts share: a result written as OUT/NAME.json + OUT/NAME.md, and printed."""

from __future__ import annotations

from pathlib import Path

from montessori.store import atomic_write_json, atomic_write_text


def publish(out: Path, name: str, data, md: list[str]):
    """OUT/NAME.json (the numbers) and OUT/NAME.md (the table), each written atomically, and the table
    printed; returns data."""
    atomic_write_json(Path(out) / f"{name}.json", data)
    atomic_write_text(Path(out) / f"{name}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return data
