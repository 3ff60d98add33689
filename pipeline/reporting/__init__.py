"""Reporting: one results table across runs (`msaflow results`) and the run report (`msaflow report`)."""
