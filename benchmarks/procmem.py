"""Peak memory of the benchmark's own process, shared by the benchmark scripts."""

from __future__ import annotations


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM: its own, unlike ru_maxrss,
    which a child inherits across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
