"""What each ``cnnkit`` command does: call the API, print the result. Parsing is in cli.py.

One module per group of commands: ``training`` (train, lr-find, tune), ``evaluation``
(evaluate, report, explain, compare, audit), ``deployment`` (export, serve, predict) and
``datasets`` (datasets, cache, models, bench); ``common`` holds the helpers they share.
Each function imports what its command needs when it runs, so ``cnnkit --help`` imports
no torch.
"""

from .common import _require_deploy_extras, _table
from .datasets import cmd_bench, cmd_cache, cmd_datasets, cmd_models
from .deployment import cmd_export, cmd_predict, cmd_serve
from .evaluation import cmd_audit, cmd_compare, cmd_evaluate, cmd_explain, cmd_report
from .training import _without_nproc, cmd_lr_find, cmd_train, cmd_tune

__all__ = [
    "_require_deploy_extras",
    "_table",
    "_without_nproc",
    "cmd_audit",
    "cmd_bench",
    "cmd_cache",
    "cmd_compare",
    "cmd_datasets",
    "cmd_evaluate",
    "cmd_explain",
    "cmd_export",
    "cmd_lr_find",
    "cmd_models",
    "cmd_predict",
    "cmd_report",
    "cmd_serve",
    "cmd_train",
    "cmd_tune",
]
