"""Missing rates: how they are spelled, the grids runs are trained, validated and scored at, and
the names of the protocols and corruptions that use them.

A grid is written "start:stop:step" (stop included) or "a,b,c". Dataset-specific grids (CH-SIMS
stops at 0.5) are the presets' (`model.config.rate_grid`); the protocols (pipeline/training/
protocols.py) pick among these. Nothing here imports torch: the workflow's config model reads
the names.
"""

from __future__ import annotations

TEST_GRID = "0.0:1.0:0.1"  # the rates a single model is scored at (MOSI/MOSEI)
COARSE_GRID = "0.0:1.0:0.2"  # train/valid rates of the frozen-text cache (CPU budget)
LNLN_GRID = "0.0:0.9:0.1"  # LNLN's protocol: test and valid rates
PROTOCOLS = ("per-rate", "single-model", "lnln")  # what each one means: pipeline/training/protocols.py
CORRUPTIONS = ("missing", "noise")  # the keys of model.missing.CORRUPTIONS


def parse_rates(spec: str) -> list[float]:
    """"0.0:1.0:0.1" (start:stop:step, stop included) or "0,0.5,1"."""
    if ":" in spec:
        start, stop, step = (float(x) for x in spec.split(":"))
        if step <= 0:
            raise ValueError(f"rate step must be > 0 in {spec!r}")
        n = int(round((stop - start) / step))
        return [round(start + i * step, 6) for i in range(n + 1)]
    return [float(x) for x in spec.split(",") if x.strip()]


def rate_key(rate: float) -> str:
    """A rate as metrics.json keys it ("0.3")."""
    return repr(round(float(rate), 6))
