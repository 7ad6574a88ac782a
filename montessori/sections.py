"""What a report section is, and how its plots are drawn: shared by `montessori.report` and the
sections other modules contribute (montessori.analysis), so neither imports the other."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field


@dataclass
class ReportSection:
    title: str
    tables: list[tuple[list[str], list[list]]] = field(default_factory=list)  # (header, rows)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (caption, base64 PNG)
    notes: list[str] = field(default_factory=list)


def png(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def figure(width: float = 6.0, height: float = 3.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(width, height))
