"""Orchestration above the stages and training: `mpr run` (experiment, report)."""
