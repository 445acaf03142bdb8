"""Benchmark rows, their medians, ratios and targets, and the table they print as."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

REF, RP = "reference", "regproxy"


@dataclass
class Target:
    """``ratio >= 2.5`` (regproxy / baseline) or ``regproxy <= 1.01`` (an absolute bound)."""

    on: str  # "ratio" or "regproxy"
    op: str  # ">=" or "<="
    value: float

    def holds(self, x: float | None) -> bool | None:
        if x is None or math.isnan(x):
            return None
        return x >= self.value if self.op == ">=" else x <= self.value

    def __str__(self) -> str:
        what = "" if self.on == "ratio" else "regproxy "
        suffix = "×" if self.on == "ratio" else ""
        return f"{what}{'≥' if self.op == '>=' else '≤'} {self.value:g}{suffix}"


@dataclass
class Row:
    section: str
    name: str
    unit: str
    higher_is_better: bool = True
    runs: dict[str, list[float]] = field(default_factory=lambda: {REF: [], RP: []})
    target: Target | None = None
    #: what the regproxy column is compared with (the reference registry by default)
    baseline: str = "docker-registry 2.8.2"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, label: str, value: float) -> None:
        self.runs.setdefault(label, []).append(value)

    def median(self, label: str) -> float | None:
        values = [v for v in self.runs.get(label, []) if v is not None and not math.isnan(v)]
        return statistics.median(values) if values else None

    @property
    def ratio(self) -> float | None:
        ref, rp = self.median(REF), self.median(RP)
        if ref is None or rp is None or ref == 0:
            return None
        return rp / ref

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        value = self.ratio if self.target.on == "ratio" else self.median(RP)
        return self.target.holds(value)

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "baseline": self.baseline,
            "runs": self.runs,
            "median": {label: self.median(label) for label in self.runs},
            "ratio": self.ratio,
            "target": None
            if self.target is None
            else {"on": self.target.on, "op": self.target.op, "value": self.target.value},
            "met": self.met,
            "note": self.note,
            "extra": self.extra,
        }


def fmt(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "—"
    if unit in ("ms", "s", "×blob"):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if abs(value) >= 100 or unit in ("MB/s", "req/s", "MiB"):
        return f"{value:,.0f}"
    return f"{value:.2f}"


def fmt_ratio(row: Row) -> str:
    r = row.ratio
    return "—" if r is None else f"{r:.2f}×"


def verdict(row: Row) -> str:
    met = row.met
    if met is None:
        return "" if row.target is None else "?"
    return "met" if met else "MISSED"


HEADERS = ("section", "measurement", "unit", "reference", "regproxy", "ratio", "target", "")


def table_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    out = []
    for row in rows:
        name = row.name if not row.note else f"{row.name} ({row.note})"
        out.append(
            (
                row.section,
                name,
                row.unit,
                fmt(row.median(REF), row.unit),
                fmt(row.median(RP), row.unit),
                fmt_ratio(row),
                "" if row.target is None else str(row.target),
                verdict(row),
            )
        )
    return out


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| " + " | ".join(HEADERS[:-1]) + " | met |", "|" + "---|" * 8]
    for r in table_rows(rows):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row], header: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        print(header)
        widths = [max(len(r[i]) for r in [HEADERS, *table_rows(rows)]) for i in range(8)]
        for r in [HEADERS, *table_rows(rows)]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return
    table = Table(title=header, title_justify="left", show_lines=False)
    for i, h in enumerate(HEADERS):
        table.add_column(h or "met", justify="right" if 3 <= i <= 5 else "left")
    for r in table_rows(rows):
        style = "red" if r[-1] == "MISSED" else ("green" if r[-1] == "met" else None)
        table.add_row(*r, style=style)
    Console(width=max(140, Console().width)).print(table)
