"""The human-readable end of a run, read back from its artifacts: the numbers (`analysis`),
`report.md` (`markdown`) and its plots (`plots`); the sweep's report (`sweep`), `rounds.md`
(`rounds`) and the signal table (`signals`); and the one number format of all their tables
(`fmt`)."""
