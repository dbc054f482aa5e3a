"""Data-parallel training (torch.distributed on gloo): N processes train what one does.

The 2-process runs are subprocesses (torchrun, or ``cnnkit train --nproc 2``), each
~10-15 s on two cores; runs compared by several tests are module-scoped fixtures.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_runs import (
    cnnkit_cmd,
    kill_job,
    metrics,
    need_mnist,
    only_run,
    run,
    start_job,
    weights,
)
from cnnkit.runs.checkpoint import load_checkpoint

ELASTIC_MARKER = ".cnnkit-elastic.json"
# float32 throughout: the same numbers from one process and from two is a float32 property
# (bf16 autocast, the default on CPUs with native bf16, rounds each share differently).
FP32 = ["--precision", "fp32"]
# No dropout, no augmentation. A global batch of 61 splits 30/31 over two ranks on every
# step, and the last batch (600 = 9 x 61 + 51) 25/26: the loss scaling of unequal shares.
SMALL = [
    "--data", "mnist", "--model", "conv8-pool-fc32", "--limit", "600",
    "--epochs", "2", "--batch-size", "61", *FP32,
]  # fmt: skip
# An epoch of a few seconds on two processes (~190 steps): time to interrupt it mid-way.
BIG = [
    "--data", "mnist", "--model", "conv8-pool-fc32", "--limit", "20000",
    "--epochs", "2", "--batch-size", "64", *FP32,
]  # fmt: skip
ATOL = 1e-5
NUMERIC = ("train_loss", "train_acc", "val_loss", "val_acc")


def _torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def assert_close_runs(a: Path, b: Path, atol: float = ATOL):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        if wa[k].is_floating_point():
            assert torch.allclose(wa[k].float(), wb[k].float(), rtol=0, atol=atol), (
                k,
                (wa[k].float() - wb[k].float()).abs().max().item(),
            )
        else:
            assert torch.equal(wa[k], wb[k]), k
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) > 0
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["epoch"] == rb["epoch"]
        for key in NUMERIC:
            assert abs(float(ra[key]) - float(rb[key])) <= atol, (key, ra, rb)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.05)
    kill_job(proc)
    pytest.fail(f"no {what} within {timeout} s")


def _training_started(run_dir_parent: Path):
    def started() -> bool:
        return any("train stage:" in log.read_text() for log in run_dir_parent.glob("*/train.log"))

    return started


def _epochs_done(runs: Path, n: int):
    def done() -> bool:
        return any(len(m.read_text().strip().splitlines()) > n for m in runs.glob("*/metrics.csv"))

    return done


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _worker(parent: int, rank: int) -> int:
    """The pid of the child of ``parent`` whose environment says RANK=<rank> (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no child of {parent} with RANK={rank}")


# ------------------------------------------------------------------ shared runs


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """SMALL trained by one process and by torchrun with two (each run auto-named, each in
    its own directory)."""
    need_mnist()
    root = tmp_path_factory.mktemp("small")
    run(cnnkit_cmd("train", *SMALL), root / "one")
    done = run(
        [*_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "cnnkit", "train", *SMALL]
        # only rank 0 logs (test_only_rank_0_writes_files); as --set, since torchrun's own
        # parser takes --log for an abbreviation of its --log-dir (docs/distributed.md)
        + ["--set", "run.log=tensorboard"],
        root / "torchrun",
    )
    return {
        "one": only_run(root / "one"),
        "torchrun": only_run(root / "torchrun"),
        "torchrun_output": done,
        "root": root,
    }


@pytest.fixture(scope="module")
def big_full(tmp_path_factory):
    """BIG trained uninterrupted by ``--nproc 2``."""
    need_mnist()
    where = tmp_path_factory.mktemp("big")
    run(cnnkit_cmd("train", *BIG, "--nproc", "2", "--name", "full"), where)
    return where / "runs" / "full"


# ------------------------------------------------------------------ equivalence


def test_two_processes_train_what_one_does(small_runs):
    """torchrun with two processes on the same global batch: same weights, same metrics."""
    assert_close_runs(small_runs["one"], small_runs["torchrun"])
    log = (small_runs["torchrun"] / "train.log").read_text()
    assert "2 processes" in log and "global batch 61" in log


def test_validation_over_two_ranks_is_exact(small_runs):
    """The MNIST val split (5,999 images) does not divide by 2: accuracy still equals."""
    assert "val 5,999" in (small_runs["one"] / "train.log").read_text()
    one, two = metrics(small_runs["one"]), metrics(small_runs["torchrun"])
    assert [r["val_acc"] for r in one] == [r["val_acc"] for r in two]
    for r1, r2 in zip(one, two, strict=True):
        # an exact fraction of 5,999: every image counted once
        assert float(r1["val_acc"]) == float(r2["val_acc"])
        assert abs(float(r2["val_acc"]) * 5999 - round(float(r2["val_acc"]) * 5999)) < 1e-6


def test_only_rank_0_writes_files(small_runs):
    one, two = small_runs["one"], small_runs["torchrun"]
    assert one.name == two.name == "mnist-conv8-pool-fc32"  # no "-2" made by rank 1
    expected = {p.name for p in one.iterdir()} | {ELASTIC_MARKER, "tensorboard"}
    assert {p.name for p in two.iterdir()} == expected
    # one event file: rank 1 logs nothing (an event file's name holds its process's pid)
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
    for run_dir in (one, two):
        log = (run_dir / "train.log").read_text()
        for epoch in (1, 2):
            assert log.count(f"epoch {epoch}/2 ") == 1, log
        assert log.count("train stage:") == 1
        assert len(metrics(run_dir)) == 2
    # nothing but runs/ (and the decode cache) in the working directory of the workers
    assert {p.name for p in (small_runs["root"] / "torchrun").iterdir()} <= {"runs", "cache"}
    # rank 1 prints nothing: every epoch line once on stdout
    out = small_runs["torchrun_output"].stdout
    assert out.count("epoch 2/2 ") == 1, out


def test_python_api_in_a_torchrun_worker_script(small_runs, tmp_path):
    """cnnkit.train() called by a script under torchrun gives the run the CLI gives."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import cnnkit\n"
        "run = cnnkit.train(data='mnist', model='conv8-pool-fc32', limit=600, epochs=2,\n"
        "                   batch_size=61, precision='fp32', quiet=True)\n"
        "print('RUN', run.path, len(run.history))\n"
    )
    done = run([*_torchrun(), "--standalone", "--nproc-per-node", "2", str(script)], tmp_path)
    run_dir = only_run(tmp_path)
    assert run_dir.name == small_runs["torchrun"].name
    assert done.stdout.count("RUN runs/mnist-conv8-pool-fc32 2") == 2, done.stdout  # each rank
    cli_files = {p.name for p in small_runs["torchrun"].iterdir()} - {"tensorboard"}  # --log
    assert {p.name for p in run_dir.iterdir()} == cli_files
    assert_close_runs(run_dir, small_runs["torchrun"], atol=1e-6)


def test_resume_on_a_different_number_of_processes(small_runs, tmp_path):
    """One epoch on two processes, the second on one: the two-epoch one-process run."""
    small_one_epoch = list(SMALL)
    small_one_epoch[SMALL.index("--epochs") + 1] = "1"
    run(cnnkit_cmd("train", *small_one_epoch, "--nproc", "2", "--name", "half"), tmp_path)
    half = tmp_path / "runs" / "half"
    assert len(metrics(half)) == 1
    run(cnnkit_cmd("train", "--resume", str(half), "--epochs", "2"), tmp_path)
    assert_close_runs(half, small_runs["one"])


# ------------------------------------------------------------------ stopping


def test_ctrl_c_mid_epoch_then_resume_equals_uninterrupted(big_full, tmp_path):
    proc = start_job(cnnkit_cmd("train", *BIG, "--nproc", "2", "--name", "cut"), tmp_path)
    try:
        _wait_for(_training_started(tmp_path / "runs"), proc, 120, "training")
        # An epoch of 20,000 images takes seconds: a moment in, it is mid-epoch 1.
        time.sleep(0.3)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert "Resume with" in err, err[-2000:]
    cut = tmp_path / "runs" / "cut"
    assert f"--resume {Path('runs') / 'cut'}" in err or f"--resume {cut}" in err, err[-2000:]
    state = load_checkpoint(cut / "last.pt")["train_state"]["state"]
    assert state["epoch"] == 0 and state["step"] > 0, state  # saved mid-epoch 1
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["cut"]
    run(cnnkit_cmd("train", "--resume", str(cut), "--nproc", "2"), tmp_path)
    assert_close_runs(cut, big_full)


def test_kill_9_of_one_rank_ends_the_job_with_a_clear_error(tmp_path):
    need_mnist()
    proc = start_job(cnnkit_cmd("train", *BIG, "--nproc", "2", "--name", "killed"), tmp_path)
    try:
        _wait_for(_training_started(tmp_path / "runs"), proc, 120, "training")
        time.sleep(0.5)
        victim, survivor = _worker(proc.pid, rank=1), _worker(proc.pid, rank=0)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 1, (out[-2000:], err[-2000:])
    assert "worker rank 1 died" in err and "SIGKILL" in err, err[-3000:]
    assert took < 60
    # the other worker was stopped too: nothing of the job is left
    time.sleep(0.5)
    assert not Path(f"/proc/{survivor}").exists() or "Z" in _state(survivor)


def test_torchrun_restart_resumes_the_run(big_full, tmp_path):
    """torchrun --max-restarts 1: rank 1 killed in epoch 2, the restarted workers resume
    from the end of epoch 1 in the same run directory and end as if never stopped.

    The restarted workers must not read the killed ones' addresses from torchrun's store
    (distributed._init_process_group prefixes the keys per restart).
    (--standalone: with --rdzv-endpoint 127.0.0.1:0 the restarted workers of torch's
    launcher hang in init_process_group, cnnkit or not.)"""
    cmd = [
        *_torchrun(),
        "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
        "--monitor-interval", "0.5",
        "-m", "cnnkit", "train", *BIG,
    ]  # fmt: skip
    proc = start_job(cmd, tmp_path)
    try:
        _wait_for(_epochs_done(tmp_path / "runs", 1), proc, 180, "the first epoch")
        time.sleep(0.5)
        os.kill(_worker(proc.pid, rank=1), signal.SIGKILL)
        out, err = proc.communicate(timeout=60)  # ~15 s when it works
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 0, (out[-2000:], err[-4000:])
    run_dir = only_run(tmp_path)  # the restart made no second run
    assert (run_dir / ELASTIC_MARKER).is_file()
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch 1/2 ") == 1 and log.count("epoch 2/2 ") == 1, log
    assert "completed" in log
    assert_close_runs(run_dir, big_full)


# ------------------------------------------------------------------ folder data


SITECUSTOMIZE = """
import os
if os.environ.get("DECODE_COUNT_FILE"):
    import cnnkit.data.folder as _folder

    _decode_one = _folder.decode_one

    def decode_one(path, *args, **kwargs):
        fd = os.open(os.environ["DECODE_COUNT_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{os.getpid()} {path}\\n".encode())
        finally:
            os.close(fd)
        return _decode_one(path, *args, **kwargs)

    _folder.decode_one = decode_one
"""


def test_folder_data_is_decoded_once_by_two_processes(tmp_path):
    import numpy as np
    from PIL import Image

    data = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    files = []
    for c, name in enumerate(("dark", "light")):
        (data / name).mkdir(parents=True)
        for i in range(20):
            a = rng.integers(0, 100, (32, 32, 3)) + 120 * c
            path = data / name / f"{name}{i}.png"
            Image.fromarray(a.astype(np.uint8)).save(path)
            files.append(path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    count_file = tmp_path / "decoded.txt"
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    work = tmp_path / "work"
    run(
        cnnkit_cmd(
            "train", "--data", str(data), "--model", "conv8-pool-fc32", "--epochs", "1",
            "--batch-size", "8", "--image-size", "32", "--nproc", "2", "--name", "shapes",
        ),
        work,
        PYTHONPATH=pythonpath,
        DECODE_COUNT_FILE=str(count_file),
    )  # fmt: skip
    assert (work / "runs" / "shapes" / "last.pt").is_file()
    lines = count_file.read_text().splitlines()
    decoded = [line.split(" ", 1)[1] for line in lines]
    assert sorted(decoded) == sorted(str(p) for p in files), (len(lines), len(files))


# ------------------------------------------------------------------ in-process units


@pytest.mark.parametrize("n", [0, 1, 5, 6, 61, 5999])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_share_partitions_without_padding(n, size):
    from cnnkit.device import World
    from cnnkit.train.distributed import share

    parts = [share(n, World(rank=r, size=size)) for r in range(size)]
    assert [i for s in parts for i in range(n)[s]] == list(range(n))  # in order, once each
    sizes = [s.stop - s.start for s in parts]
    assert max(sizes) - min(sizes) <= 1


def test_share_gives_the_extra_items_to_the_first_ranks():
    from cnnkit.device import World
    from cnnkit.train.distributed import share

    sizes = [len(range(5)[share(5, World(rank=r, size=2))]) for r in range(2)]
    assert sizes == [3, 2]
    sizes = [len(range(61)[share(61, World(rank=r, size=3))]) for r in range(3)]
    assert sizes == [21, 20, 20]


def test_share_never_gives_a_rank_fewer_than_the_minimum():
    from cnnkit.device import World
    from cnnkit.train.distributed import share

    # too few items for every rank to get `minimum`: the first ranks take them all
    for n, size, minimum in [(3, 4, 2), (5, 4, 2), (9, 4, 2), (1, 2, 2), (7, 3, 3)]:
        parts = [share(n, World(rank=r, size=size), minimum) for r in range(size)]
        assert [i for s in parts for i in range(n)[s]] == list(range(n))
        sizes = [len(range(n)[s]) for s in parts]
        assert all(k == 0 or k >= minimum for k in sizes) or n < minimum, (n, size, sizes)
        assert sizes == sorted(sizes, reverse=True), sizes


def test_without_nproc():
    from cnnkit.commands import _without_nproc

    argv = ["train", "--nproc", "2", "--data", "mnist", "--nproc=3", "--name", "nproc"]
    assert _without_nproc(argv) == ["train", "--data", "mnist", "--name", "nproc"]
    assert _without_nproc(["train"]) == ["train"]


def test_nproc_is_refused_under_torchrun(monkeypatch, capsys):
    from cnnkit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert main(["train", "--data", "mnist", "--nproc", "2"]) == 1
    assert "torchrun" in capsys.readouterr().err


def test_sync_bn_is_refused_on_cpus(tmp_path):
    from cnnkit.config import Config, apply_overrides
    from cnnkit.device import World
    from cnnkit.train.api import _plan_run

    cfg = apply_overrides(Config(), {"data": "mnist", "train.sync_bn": True})
    with pytest.raises(ValueError, match="sync-bn needs CUDA"):
        _plan_run(cfg, tmp_path, None, World(rank=0, size=2), torch.device("cpu"))


def test_batch_smaller_than_the_world_is_refused(mnist_dir, tmp_path):
    from cnnkit.config import Config, apply_overrides
    from cnnkit.device import World
    from cnnkit.train.api import _plan_run

    cfg = apply_overrides(
        Config(),
        {"data": "mnist", "model": "conv8-pool-fc32", "limit": 100, "batch_size": 2},
    )
    with pytest.raises(ValueError, match="--batch-size 2 is the batch of all 3 processes"):
        _plan_run(cfg, tmp_path, None, World(rank=0, size=3), torch.device("cpu"))


# ------------------------------------------------------------------ GPUs


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)
def test_two_gpus_nccl_bf16_compiled(tmp_path):
    need_mnist()
    done = run(
        [
            *_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "cnnkit", "train",
            *SMALL, "--device", "cuda", "--precision", "bf16", "--compile", "true",
        ],
        tmp_path,
        timeout=600,
    )  # fmt: skip
    run_dir = only_run(tmp_path)
    log = (run_dir / "train.log").read_text()
    assert "(nccl)" in log and "bfloat16" in log.replace("bf16", "bfloat16"), log
    assert "channels_last" in log
    rows = metrics(run_dir)
    assert len(rows) == 2 and float(rows[-1]["val_acc"]) > 0.5, rows
    assert "epoch 2/2 " in done.stdout
