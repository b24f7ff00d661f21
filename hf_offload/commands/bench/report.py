"""Turning measured methods into rows, a table, ratio lines and a JSON document."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from ...units import GB


@dataclass
class Row:
    method: str
    status: str  # "ok", "skipped", "oom" or "error"
    seq: int | None = None  # tokens per sequence, in a sweep over sequence lengths (--seq_lens, --long_context)
    reason: str | None = None
    step_times_s: list[float] = field(default_factory=list)
    step_time_s: float | None = None  # median of the timed steps
    tokens_per_s: float | None = None
    model_tflops: float | None = None  # 6 * N * tokens / step time
    h2d_gbps: float | None = None  # weight bytes moved host->device per step / step time
    h2d_of_peak: float | None = None  # h2d_gbps / the pinned-copy peak measured in this run
    copy_overlap_share: float | None = None
    copy_hidden_share: float | None = None
    gpu_busy_share: float | None = None
    peak_gpu_bytes: int | None = None
    peak_host_rss_bytes: int | None = None
    host_rss_scope: str | None = None
    losses: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def finish(self, tokens: int, flops_parameters: int, h2d_bytes: int | None, h2d_peak_gbps: float | None):
        """Derive the rate columns from the step times."""
        if not self.step_times_s:
            return
        self.step_time_s = statistics.median(self.step_times_s)
        self.tokens_per_s = tokens / self.step_time_s
        self.model_tflops = 6 * flops_parameters * tokens / self.step_time_s / 1e12
        if h2d_bytes is not None:
            self.h2d_gbps = h2d_bytes / self.step_time_s / GB
            if h2d_peak_gbps:
                self.h2d_of_peak = self.h2d_gbps / h2d_peak_gbps


def ratios(rows: list[Row]) -> dict[str, float]:
    """hf_offload against every other method that ran: step time ratio (>1 means hf_offload is slower)."""
    by_name = {r.method: r for r in rows if r.step_time_s}
    ours = by_name.get("hf_offload")
    if ours is None:
        return {}
    return {
        f"hf_offload/{name} step time": ours.step_time_s / row.step_time_s
        for name, row in by_name.items()
        if name != "hf_offload"
    }


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


COLUMNS = [
    ("method", lambda r: r.method),
    ("seq", lambda r: "-" if r.seq is None else f"{r.seq:,}"),
    ("step s", lambda r: _fmt(r.step_time_s, ".3f")),
    ("tokens/s", lambda r: _fmt(r.tokens_per_s, ",.0f")),
    ("TFLOP/s", lambda r: _fmt(r.model_tflops, ".3g")),
    ("H2D GB/s", lambda r: _fmt(r.h2d_gbps, ".1f")),
    ("% of peak", lambda r: _fmt(r.h2d_of_peak, ".0%")),
    ("copy||compute", lambda r: _fmt(r.copy_overlap_share, ".0%")),
    ("copy hidden", lambda r: _fmt(r.copy_hidden_share, ".0%")),
    ("GPU busy", lambda r: _fmt(r.gpu_busy_share, ".0%")),
    ("peak GPU GB", lambda r: _fmt(r.peak_gpu_bytes, ".2f", GB)),
    ("peak RSS GB", lambda r: _fmt(r.peak_host_rss_bytes, ".2f", GB)),
    ("loss", lambda r: _fmt(r.losses[-1] if r.losses else None, ".4f")),
]


def table(rows: list[Row]) -> str:
    """Aligned text table; columns no row has a value for (the CUDA ones on a CPU run, `seq` outside a sweep) are
    left out. A row that did not run shows its method (and length) and why."""
    ok = [row for row in rows if row.status == "ok"]
    named = [row.seq is not None for row in rows]  # the seq column names rows in a sweep, whether they ran or not
    columns = [
        (n, get)
        for i, (n, get) in enumerate(COLUMNS)
        if i == 0 or (n == "seq" and any(named)) or any(get(r) != "-" for r in ok)
    ]
    keys = 2 if any(named) else 1  # leading columns that name a row
    cells = [[name for name, _ in columns]]
    for row in rows:
        if row.status == "ok":
            cells.append([get(row) for _, get in columns])
        else:
            cells.append([get(row) for _, get in columns[:keys]] + [f"{row.status}: {row.reason}"])
    full = [c for c in cells if len(c) == len(columns)]
    widths = [
        max(len(c[i]) for c in (cells if i < keys else full)) if i else max(len(c[0]) for c in cells)
        for i in range(len(columns))
    ]
    lines = []
    for k, c in enumerate(cells):
        justified = [x.ljust(widths[0]) if i == 0 else x.rjust(widths[i]) for i, x in enumerate(c[:keys])]
        if len(c) == len(columns):
            justified += [x.rjust(widths[i]) for i, x in enumerate(c) if i >= keys]
            lines.append("  ".join(justified))
        else:
            lines.append("  ".join([*justified, c[keys]]))
        if k == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def row_dict(row: Row) -> dict:
    return asdict(row)
