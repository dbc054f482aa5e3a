"""A run's one home: its directory (directory.py), its checkpoints (checkpoint.py), loading
it back as a ``Run`` (run.py), inference with it (inference.py) and comparing runs
(compare.py)."""
