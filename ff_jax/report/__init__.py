"""The human-readable end of a run, read back from its artifacts: `report.md` (`markdown`) and
its plots (`plots`)."""
