"""EMT-DLFR, baselines, losses and metrics."""
