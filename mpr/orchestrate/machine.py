"""What machine a result was computed on, recorded beside every figure `mpr run` and `mpr study` write."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def hardware() -> dict[str, Any]:
    """CPU model, cores, GPU and the torch and Python versions; `summary` says it in one line."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    text = f"{cpu}, {os.cpu_count()} CPUs, " + (f"GPU {gpu}" if gpu else "no GPU")
    return {
        "summary": f"{text} (torch {torch.__version__}, python {platform.python_version()})",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
    }
