"""Training: the loop (loop.py), its stages (stages.py), hooks, optimizers and schedules,
the batch-size finder; api.py sets a run up and runs its stages.

``cnnkit.train(...)`` (defined in api.py) is the entry point. This file stays free of
imports: the package root imports it to keep the name ``cnnkit.train`` for that function.
"""
