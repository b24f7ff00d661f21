"""Measuring a benchmark run: step clock, peak host and device memory, pinned-copy peak, copy/compute overlap.

Note: [How copy/compute overlap is measured]
After the timed steps, one more step runs under `torch.profiler` with CUDA activity. Its trace lists every GPU
kernel and every memcpy with device timestamps. On that step:
  - compute = union of the intervals of all kernels (any stream);
  - copy    = union of the intervals of all host->device memcpys (the layer loads: copy stream);
  - span    = first to last GPU activity of the step.
`copy_overlap_share` = |copy ∩ compute| / span: the share of step time in which the copy stream moved data
while a kernel ran (what the issue asks for). `copy_hidden_share` = |copy ∩ compute| / |copy|: how much of the
copying was hidden behind compute (1.0 = fully hidden). `gpu_busy_share` = |compute| / span: how much of the
step the GPU computed at all (the figure DeepSpeed users find at 30-60%). The profiler slows the host side,
so the profiled step is not one of the timed steps; device-side intervals are what it is used for.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from ...engine.device import DeviceOps
from ...engine.store import page_aligned_empty

# --- steps -----------------------------------------------------------------------------------------------------------


class StepClock:
    """Times a schedule of steps: `warmup` untimed, `steps` timed, then one profiled step on CUDA.

    A training loop calls `begin()` before and `end()` after each step (a Trainer does it from a callback).
    Each timed step ends with a device synchronisation, so a step's time is all of its work.
    """

    def __init__(self, device: torch.device, warmup: int, steps: int, profile: bool):
        self.device = device
        self.schedule = ["warmup"] * warmup + ["timed"] * steps + (["profile"] if profile else [])
        self.times: list[float] = []
        self.losses: list[float] = []
        self.trace: dict | None = None
        self.on_first_timed_step: list = []  # callbacks, e.g. reset the streaming counters
        self.after_timed_steps: list = []  # callbacks, e.g. read the streaming counters
        self.profile_error: str | None = None
        self._index = 0
        self._start = 0.0
        self._profiler = None

    @property
    def total_steps(self) -> int:
        return len(self.schedule)

    @property
    def kind(self) -> str:
        return self.schedule[self._index]

    def begin(self) -> None:
        if self._index >= len(self.schedule):
            raise RuntimeError("StepClock: more steps than scheduled")
        synchronize(self.device)
        if self.kind == "timed" and not self.times:
            for callback in self.on_first_timed_step:
                callback()
        if self.kind == "profile":
            self._profiler = _start_profiler()
        self._start = time.perf_counter()

    def end(self, loss: float | torch.Tensor | None = None) -> None:
        synchronize(self.device)
        elapsed = time.perf_counter() - self._start
        if self.kind == "timed":
            self.times.append(elapsed)
            if len(self.times) == self.schedule.count("timed"):
                for callback in self.after_timed_steps:
                    callback()
        if self.kind == "profile":
            self.trace, self.profile_error = _stop_profiler(self._profiler)
            self._profiler = None
        if loss is not None:
            self.losses.append(float(loss))
        self._index += 1


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


# --- profiler (CUDA) -------------------------------------------------------------------------------------------------


def _start_profiler():
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    )
    profiler.__enter__()
    return profiler


def _stop_profiler(profiler) -> tuple[dict | None, str | None]:
    try:
        profiler.__exit__(None, None, None)
        return chrome_trace(profiler), None
    except Exception as err:  # the profile only adds columns; never lose the timed steps over it
        return None, f"profiler failed: {type(err).__name__}: {err}"


def chrome_trace(profiler) -> dict:
    """The finished `torch.profiler.profile`'s events, as the Chrome trace it exports (`traceEvents`, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)


@dataclass
class Overlap:
    span_s: float
    compute_s: float
    copy_s: float
    overlap_s: float
    h2d_bytes: int | None  # bytes of the host->device memcpys of the step, where the trace records them

    @property
    def copy_overlap_share(self) -> float:
        return self.overlap_s / self.span_s if self.span_s else 0.0

    @property
    def copy_hidden_share(self) -> float | None:
        return self.overlap_s / self.copy_s if self.copy_s else None

    @property
    def gpu_busy_share(self) -> float:
        return self.compute_s / self.span_s if self.span_s else 0.0


def overlap_from_trace(trace: dict) -> Overlap | None:
    """Copy/compute overlap of one profiled step from a Chrome trace (see Note: [How copy/compute overlap ...])."""
    kernels, copies, everything = [], [], []
    h2d_bytes: int | None = 0
    for event in trace.get("traceEvents", []):
        if event.get("ph") != "X" or "dur" not in event:
            continue
        category = event.get("cat", "")
        interval = (float(event["ts"]), float(event["ts"]) + float(event["dur"]))
        if category == "kernel":
            kernels.append(interval)
        elif category in ("gpu_memcpy", "gpu_memset"):
            if category == "gpu_memcpy" and "HtoD" in event.get("name", ""):
                copies.append(interval)
                nbytes = event.get("args", {}).get("bytes")
                h2d_bytes = None if nbytes is None or h2d_bytes is None else h2d_bytes + int(nbytes)
        else:
            continue
        everything.append(interval)
    if not everything:
        return None
    span = max(e for _, e in everything) - min(s for s, _ in everything)
    compute, copy = union(kernels), union(copies)
    us = 1e-6
    return Overlap(
        span_s=span * us,
        compute_s=length(compute) * us,
        copy_s=length(copy) * us,
        overlap_s=length(intersect(compute, copy)) * us,
        h2d_bytes=h2d_bytes if copies else 0,
    )


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint intervals covering the same points as `intervals`."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Intersection of two sorted, disjoint interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


# --- memory ----------------------------------------------------------------------------------------------------------


@dataclass
class MemoryPeaks:
    host_rss_bytes: int | None = None
    host_rss_scope: str = ""  # "method" (reset before the method) or "process" (since the process started)
    device_bytes: int | None = None
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def memory_peaks(device: torch.device):
    """Peak host RSS and peak device memory allocated while the body runs (model build included)."""
    peaks = MemoryPeaks()
    per_method = _reset_rss_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield peaks
    finally:
        peaks.host_rss_bytes, peaks.host_rss_scope = _rss_peak(per_method)
        if device.type == "cuda":
            peaks.device_bytes = torch.cuda.max_memory_allocated(device)


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak(per_method: bool) -> tuple[int | None, str]:
    if per_method:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "method"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "process"


def current_peak_rss() -> int | None:
    """Peak RSS of this process since start or the last reset (VmHWM), else since start (getrusage)."""
    return _rss_peak(per_method=os.path.exists("/proc/self/status"))[0]


# --- the link --------------------------------------------------------------------------------------------------------


def pinned_copy_peak(device: torch.device, nbytes: int, repeats: int = 8) -> float:
    """Host->device GB/s of a plain copy of `nbytes` from page-locked memory (the link's practical peak).

    The host buffer is page-locked the way the engine locks its store (cudaHostRegister on a page-aligned
    buffer), so the peak and the engine's copies come from the same kind of memory.
    """
    ops = DeviceOps(device)
    host = page_aligned_empty(nbytes)
    if not ops.pin(host):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)  # warm up: first-touch costs, context, allocator
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        target.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    ops.unpin(host)
    return nbytes * repeats / seconds / 1e9
