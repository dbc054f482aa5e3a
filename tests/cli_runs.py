"""Helpers of the tests that run cnnkit in subprocesses (test_distributed, test_stream,
test_shards): the environment, the command, the run directory, its weights and metrics;
and shard sets written by hand."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from cnnkit.data import BUILTINS, is_available

RUN_TIMEOUT = 300


def need_mnist() -> None:
    """Skip without MNIST; in CI (where it must be) fail instead."""
    if is_available(BUILTINS["mnist"]) is None:
        message = "MNIST not found; set CNNKIT_DATA to a directory holding mnist/"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def cli_env(where: Path, **extra) -> dict:
    """The environment of a cnnkit subprocess: offline, a cache of its own, bounded waits."""
    env = dict(os.environ)
    env.update(
        CNNKIT_OFFLINE="1",
        CNNKIT_DIST_TIMEOUT="60",
        XDG_CACHE_HOME=str(where / "cache"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def cnnkit_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "cnnkit", *map(str, args)]


def run(
    cmd: list[str], cwd: Path, timeout: float = RUN_TIMEOUT, **env
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd``; it must succeed."""
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        cmd, cwd=cwd, env=cli_env(cwd, **env), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (cmd, done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    return done


def only_run(cwd: Path) -> Path:
    """The one run directory under cwd/runs (fails when there are several)."""
    runs = sorted((cwd / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["state_dict"]


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of (name, bytes) members, as a shard is written by hand in a test."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def start_job(cmd: list[str], cwd: Path, **env) -> subprocess.Popen:
    """``cmd`` started in a session of its own (a Ctrl-C goes to its process group)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=cli_env(cwd, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def children(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a job and the workers it started (torch starts each in a session of its own,
    so killing the job's process group leaves them running)."""
    for pid in children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def write_shard_set(
    folder: Path,
    shards: list[list[tuple[str, bytes]]],
    classes: list[str],
    channels: int,
    image_size: int,
) -> None:
    """A train split written by hand (a tar per list of members) with its index.json; each
    shard's count and the class counts are those of its keys and .cls members."""
    entries, class_counts = [], [0] * len(classes)
    for i, members in enumerate(shards):
        name = f"train-{i:06d}.tar"
        write_tar(folder / name, members)
        keys = {member.split(".")[0] for member, _ in members}
        entries.append({"name": name, "count": len(keys), "bytes": 0})
        for member, data in members:
            if member.endswith(".cls"):
                class_counts[int(data)] += 1
    index = {
        "format": "cnnkit.shards/1",
        "classes": classes,
        "channels": channels,
        "image_size": image_size,
        "splits": {
            "train": {
                "count": sum(e["count"] for e in entries),
                "class_counts": class_counts,
                "shards": entries,
            }
        },
    }
    (folder / "index.json").write_text(json.dumps(index))
