"""Run a command and report the peak anonymous memory of its process tree, sampled every 20 ms.

    python tools/peak_memory.py -- hf-offload launch --base_weight_dtype nf4 -- python examples/plain_trainer.py ...

Anonymous memory (RssAnon: heap, torch tensors, private mappings) is what a machine cannot page out to a file; a
memory-mapped checkpoint's pages are file-backed and do not count. The figure is the largest sum over the tree's
processes at one sample, so the launcher and its child are counted together.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def _anon_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon")), 0)
    except OSError:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.perf_counter()
    process = subprocess.Popen(command)
    peak = 0
    while process.poll() is None:
        peak = max(peak, sum(_anon_bytes(p) for p in _tree(process.pid)))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(
        f"peak anonymous memory {peak / 2**30:.2f} GiB ({peak / total:.2f} of this machine's "
        f"{total / 2**30:.1f} GiB), {seconds:.0f} s, exit status {process.returncode}",
        file=sys.stderr,
    )
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
