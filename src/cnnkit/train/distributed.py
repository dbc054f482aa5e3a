"""Data-parallel training across processes, GPUs and machines, on torch.distributed.

The engine is PyTorch's own: torchrun (or ``cnnkit train --nproc N``, which calls the same
elastic launcher) starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous; ``join()`` reads them, joins the process group (NCCL between GPUs, gloo
between CPUs) and picks the process's device; the model is wrapped in
DistributedDataParallel, which averages the gradients.

What cnnkit adds, and why (docs/distributed.md is the user's view):

- **The global batch.** ``--batch-size`` is the batch of one optimisation step over all
  processes. Every rank draws the same seeded permutation and takes a contiguous share of
  each global batch (``share``); the loss of a share is its sum over the global batch's
  size, times the world size that DDP's averaging divides back out. The gradient is then
  one process's gradient on the whole batch, even for the short last batch, whose shares
  are unequal: N processes take the same steps as one (up to the order of float sums).
- **One writer, one decision.** Rank 0 writes every file and prints; the epoch's row
  (metrics, and so best epoch, early stopping, divergence) is rank 0's, sent to all; stop
  requests (Ctrl-C, SIGTERM, the time budget) are agreed by every rank at the same step.
- **No hang.** Every collective has a timeout (``CNNKIT_DIST_TIMEOUT`` seconds, default
  1800, PyTorch's own default for gloo); a rank that dies closes its connections, so gloo
  fails at once and the launcher stops the other workers.
- **Control messages on gloo.** Flags and small objects go over a CPU (gloo) group, so
  agreeing on a flag never waits for a GPU's queued work.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cnnkit.device import World, resolve_device

T = TypeVar("T")

# Stop requests and the time budget are agreed every this many steps (and at step 0):
# an agreement is one small gloo all-reduce, cheap next to a step but not free.
AGREE_EVERY = 10
_control = None  # the gloo group for flags and objects (None: the default group is gloo)

# `cnnkit train --nproc` tells its workers where to leave the run directory's path, so
# that it can name the run when it says how to resume.
RUN_DIR_FILE_ENV = "CNNKIT_LAUNCH_RUN_DIR_FILE"


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process stopped: a
    torch.distributed error, or gloo's own RuntimeError for a closed connection."""
    names = {klass.__name__ for klass in type(error).__mro__}
    if names & {"DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    text = str(error)
    signs = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out")
    return isinstance(error, RuntimeError) and any(sign in text for sign in signs)


def timeout() -> datetime.timedelta:
    """How long any collective may wait: CNNKIT_DIST_TIMEOUT seconds (default 1800)."""
    text = os.environ.get("CNNKIT_DIST_TIMEOUT", "1800")
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"CNNKIT_DIST_TIMEOUT={text!r} is not a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or --nproc)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def ever_joined() -> bool:
    """Whether this process has joined a process group (errors before that are the same
    on every rank: the settings, read alike)."""
    return _ever_joined


_ever_joined = False


def join(device_setting: str = "auto") -> tuple[World, torch.device, bool]:
    """(this process's World, its device, whether this call created the process group).

    One process: World() and the device the setting names. Under torchrun: the process
    group joined (NCCL when the devices are GPUs, else gloo), and on GPUs the device
    cuda:LOCAL_RANK. A group the caller created already is used as it is.
    """
    if not launched():
        return World(), resolve_device(device_setting), False
    device = resolve_device(device_setting)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per machine"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise RuntimeError(
            f"distributed training runs on CUDA GPUs or CPUs, not {device.type}; "
            "use --device cpu or one process"
        )
    global _ever_joined
    _ever_joined = True
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        _init_process_group(backend)
    backend = dist.get_backend()
    global _control
    if _control is None and backend != "gloo":  # made once, kept while the group lives
        _control = dist.new_group(backend="gloo", timeout=timeout())
    world = World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=local_rank,
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        backend=backend,
    )
    return world, device, created


def _init_process_group(backend: str) -> None:
    """init_process_group from torchrun's environment. After a restart (--max-restarts)
    the keys go under a prefix of their own: the store outlives the killed workers, and
    their addresses in it would otherwise be read by the new ones, which then connect to
    a dead process (refused, or a hang)."""
    restart = restart_count()
    if not restart:
        dist.init_process_group(backend, timeout=timeout())
        return
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store, rank, size = next(dist.rendezvous("env://", rank, size, timeout=timeout()))
    store = dist.PrefixStore(f"cnnkit/restart-{restart}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout())


def leave(created: bool) -> None:
    """Leave the process group if ``join`` created it."""
    global _control
    if created and dist.is_initialized():
        dist.destroy_process_group()
        _control = None


@contextlib.contextmanager
def joined(device_setting: str = "auto") -> Iterator[tuple[World, torch.device]]:
    """``join`` for the block: (world, device); the group is left after it, if made here."""
    world, device, created = join(device_setting)
    try:
        yield world, device
    finally:
        leave(created)


# ------------------------------------------------------------------ collectives


def all_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (a no-op for one process)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_values(values: list[float], world: World) -> list[float]:
    """Each value summed over the ranks, in float64 (on the CPU group: no GPU involved)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_control)
    return t.tolist()


def any_rank(flags: list[bool], world: World) -> list[bool]:
    """Each flag true on any rank: the decision every rank then takes together."""
    if not world.distributed:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return [bool(v) for v in t.tolist()]


def from_main(obj: T, world: World) -> T:
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def gather_objects(obj: Any, world: World) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj, group=_control)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier(group=_control)


class MainRankFailed(RuntimeError):
    """What rank 0 failed at, raised on the other ranks (rank 0 reports it to the user)."""


def on_main(fn: Callable[[], T], world: World) -> T:
    """``fn()`` run by rank 0 alone (a file written, a directory made), its result sent
    to every rank; an error on rank 0 is raised on every rank, so none waits forever."""
    if not world.distributed:
        return fn()
    result = error = None
    if world.is_main:
        try:
            result = fn()
        except Exception as e:  # sent to the others, then raised here too
            error = e
    result, error_text = from_main((result, None if error is None else _error_text(error)), world)
    if error is not None:
        raise error
    if error_text is not None:
        raise MainRankFailed(f"rank 0: {error_text}")
    return result


def _error_text(error: Exception) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def share(n: int, world: World, minimum: int = 1) -> slice:
    """This rank's contiguous part of ``n`` items; no item is repeated or left out (no
    padding). The parts differ by at most one item, the first ranks taking the extra ones,
    and none is smaller than ``minimum`` (unless ``n`` is): with too few items for every
    rank, the first ranks take them all and the last take none. (Training batches ask for
    2: BatchNorm cannot normalise a batch of one image.)"""
    ranks = max(1, min(world.size, n // minimum))  # the ranks that get items
    if world.rank >= ranks:
        return slice(n, n)
    q, extra = divmod(n, ranks)
    start = world.rank * q + min(world.rank, extra)
    return slice(start, start + q + (world.rank < extra))


def gather_rows(part: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's rows of a tensor (each rank's ``share`` of it), concatenated in rank
    order. all_gather needs equal sizes, so each part is padded to the largest and the
    padding cut off again."""
    if not world.distributed:
        return part
    sizes = gather_objects((len(part), tuple(part.shape[1:]), part.dtype), world)
    filled = [s for s in sizes if s[0]]
    if not filled:
        return part
    rows, shape, dtype = max(s[0] for s in sizes), filled[0][1], filled[0][2]
    padded = torch.zeros((rows, *shape), dtype=dtype, device=part.device)
    padded[: len(part)] = part.reshape(len(part), *shape)
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: s[0]] for p, s in zip(parts, sizes, strict=True)])


# ------------------------------------------------------------------ the launcher


def launch(nproc: int, argv: list[str]) -> tuple[int, str]:
    """Run ``cnnkit <argv>`` in ``nproc`` worker processes on this machine through torch's
    elastic launcher (what torchrun calls): a c10d rendezvous on 127.0.0.1 at a free
    port. Returns (exit code, what to tell the user; empty when the workers said it)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The CPU cores are shared out: two processes each using every core would only fight.
    cores = os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    fd, run_dir_file = tempfile.mkstemp(prefix="cnnkit-launch-", suffix=".txt")
    os.close(fd)
    os.environ[RUN_DIR_FILE_ENV] = run_dir_file
    # Seconds the workers get to save after Ctrl-C or SIGTERM before they are killed
    # (torch's default is 30); older torch has no such setting.
    grace = {"shutdown_timeout": 120} if "shutdown_timeout" in _fields(LaunchConfig) else {}
    config = LaunchConfig(
        **grace,
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # this machine only; 0: any free port
        max_restarts=0,
        monitor_interval=0.5,  # how soon a dead worker is noticed
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "cnnkit", *argv)
        return 0, ""
    except SignalException:  # Ctrl-C or SIGTERM: passed on; rank 0 says where it saved
        return 130, ""
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes <= {1, 2, 130}:  # the workers said what went wrong themselves
            return max(codes), ""
        rank, failure = min(e.failures.items(), key=lambda item: item[1].timestamp)
        how = (
            f"killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exit code {failure.exitcode}"
        )
        return 1, _resume_hint(
            run_dir_file, nproc, f"worker rank {rank} died ({how}); the other workers were stopped"
        )
    finally:
        os.environ.pop(RUN_DIR_FILE_ENV, None)
        Path(run_dir_file).unlink(missing_ok=True)


def _fields(klass) -> set[str]:
    return set(getattr(klass, "__dataclass_fields__", {}))


def _resume_hint(run_dir_file: str, nproc: int, what: str) -> str:
    run_dir = Path(run_dir_file).read_text().strip() if Path(run_dir_file).exists() else ""
    if run_dir and (Path(run_dir) / "last.pt").exists():
        return f"{what}. Resume with: cnnkit train --resume {run_dir} --nproc {nproc}"
    return f"{what}; no checkpoint was saved yet"


def tell_launcher(run_dir: Path, world: World) -> None:
    """Leave the run directory's path where ``launch`` looks for it (rank 0, --nproc)."""
    target = os.environ.get(RUN_DIR_FILE_ENV)
    if target and world.is_main:
        Path(target).write_text(str(run_dir))


# ------------------------------------------------------------------ torchrun restarts


def restart_count() -> int:
    """How often torchrun restarted the workers (--max-restarts); 0 on the first start."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


ELASTIC_MARKER = ".cnnkit-elastic.json"


def mark_elastic_run(run_dir: Path, world: World) -> None:
    """Record torchrun's job id in the run directory, so that restarted workers of the
    same job find the run to resume (rank 0)."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job and world.is_main:
        (run_dir / ELASTIC_MARKER).write_text(json.dumps({"run_id": job}))


def elastic_run(runs_dir: Path, name: str | None) -> Path | None:
    """The run a restarted torchrun job had started: its --name, or the newest run
    directory marked with the job's id."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if name:  # the named run, if a torchrun job made it (and, where ids tell, this job)
        marker = runs_dir / name / ELASTIC_MARKER
        if not marker.is_file():
            return None
        try:
            made_by = json.loads(marker.read_text()).get("run_id")
        except (OSError, ValueError):
            return None
        return marker.parent if made_by == job or job in (None, "", "none") else None
    if job in (None, "", "none"):  # torchrun's default --rdzv-id: shared by every job
        return None
    found = []
    for marker in runs_dir.glob(f"*/{ELASTIC_MARKER}"):
        try:
            if json.loads(marker.read_text()).get("run_id") == job:
                found.append(marker.parent)
        except (OSError, ValueError):
            continue
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
