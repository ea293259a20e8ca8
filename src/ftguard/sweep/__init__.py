"""Sweeps: a grid of runs (defenses × axes × attack settings × seeds) sharing their units, and its report."""

from ftguard.sweep.config import SweepConfig, SweepRun, expand, load_sweep

__all__ = ["SweepConfig", "SweepRun", "expand", "load_sweep"]
