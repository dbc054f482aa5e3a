"""The label-error audit against planted errors: how many of them it finds, and how fast.

For each data set: a seeded 5% of the labels are changed to another class at random, the
audit runs on the changed labels, and its list is scored against the changed images:
- precision and recall of the list the audit makes (its own length: the number of
  label errors confident learning estimates);
- precision of its first k entries, k = the number of changed labels (then precision
  equals recall);
and the seconds it took. When cleanlab is installed beside cnnkit, its find_label_issues
is scored on the same out-of-sample probabilities, for comparison. One JSON line each.

    python benchmarks/audit.py                     # MNIST 2,000 and cats vs dogs
    python benchmarks/audit.py --sets mnist --limit 60000 --share 0
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from cnnkit.config import Config, apply_overrides
from cnnkit.data import BUILTINS, is_available
from cnnkit.device import describe
from cnnkit.evaluate.confident import find_label_issues
from cnnkit.train.audit import _audit_config, audit, load_audit_data


def planted(labels: torch.Tensor, classes: int, share: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(len(labels), generator=g)[: round(len(labels) * share)]
    noisy = labels.clone()
    shift = torch.randint(1, classes, (len(flipped),), generator=g)
    noisy[flipped] = (noisy[flipped] + shift) % classes
    return noisy, set(flipped.tolist())


def score(listed: list[int], flipped: set[int]) -> dict:
    found = set(listed) & flipped
    k = len(flipped)
    top = set(listed[:k]) & flipped
    return {
        "listed": len(listed),
        "precision": round(len(found) / max(len(listed), 1), 3),
        "recall": round(len(found) / max(k, 1), 3),
        f"precision_at_{k}": round(len(top) / max(k, 1), 3),
    }


def cats_dogs() -> str | None:
    import os
    from pathlib import Path

    for root in os.environ.get("CNNKIT_DATA", "").split(os.pathsep):
        if root and (Path(root) / "cats_vs_dogs" / "train").is_dir():
            return str(Path(root) / "cats_vs_dogs")
    return None


def run(name: str, data: str, limit: int | None, share: float, seed: int, top: int) -> None:
    cfg = _audit_config(apply_overrides(Config(), {"data": data}))
    loaded = load_audit_data(cfg, limit)
    noisy, flipped = planted(loaded.images.labels, len(loaded.classes), share, seed)
    t0 = time.perf_counter()
    result = audit(cfg, limit=limit, labels=noisy, quiet=True)
    seconds = time.perf_counter() - t0
    record = {
        "benchmark": "audit",
        "data": name,
        "images": len(noisy),
        "planted": len(flipped),
        "method": result.method,
        "cross_validated_accuracy": round(result.cv_accuracy, 4),
        "seconds": round(seconds, 1),
        "cpu": describe(torch.device("cpu")),
    }
    labels = noisy.numpy()
    if flipped:
        for method in ("self_confidence", "prune_by_noise_rate"):
            issues = find_label_issues(labels, result.probs, method)
            record[method] = score(issues.indices.tolist(), flipped)
        try:
            from cleanlab.filter import find_label_issues as cleanlab_issues

            ranked = cleanlab_issues(
                labels, result.probs, return_indices_ranked_by="self_confidence"
            )
            record["cleanlab"] = score(list(np.asarray(ranked)), flipped)
        except ImportError:
            record["cleanlab"] = "not installed"
    else:  # the data as published: show the top suspects
        record["flagged"] = len(result.issues)
        record["top"] = result.rows(top)
    print(json.dumps(record), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "cats_vs_dogs"])
    p.add_argument("--limit", type=int, default=2000, help="MNIST images (default 2,000)")
    p.add_argument("--share", type=float, default=0.05, help="labels changed (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=24, help="with --share 0: suspects shown")
    args = p.parse_args()
    for name in args.sets:
        if name == "mnist" and is_available(BUILTINS["mnist"]):
            run("mnist", "mnist", args.limit, args.share, args.seed, args.top)
        elif name == "cats_vs_dogs" and cats_dogs():
            run("cats_vs_dogs", cats_dogs(), None, args.share, args.seed, args.top)
        else:
            print(json.dumps({"benchmark": "audit", "data": name, "skipped": "not found"}))


if __name__ == "__main__":
    main()
