"""Training: the loop (loop.py), its hooks, optimizers and schedules, checkpoints.

``cnnkit.train(...)`` (defined in api.py) is the entry point.
"""
