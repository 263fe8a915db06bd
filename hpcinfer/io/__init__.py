"""The worker's data path: streaming readers, row validation, atomic part writers, the
resume ledger and collect. Compute side; nothing here imports the engine."""
