"""Facts about the machine a benchmark ran on, for the reports' headers."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average(digits: int = 2) -> str:
    """The 1/5/15-minute load averages, e.g. ``"0.52, 0.61, 0.70"`` (``"n/a"`` where unknown)."""
    try:
        return ", ".join(f"{value:.{digits}f}" for value in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"
