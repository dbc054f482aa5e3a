"""Where and how a run computes: the device, the precision, the memory layout, the
evaluation batch, what the device has free; resolved once per run into an
``ExecutionContext`` that training, evaluation, export and serving take."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device '{name}' requested but MPS is not available; use --device cpu")
    return device


def describe(device: torch.device, threads: int | None = None) -> str:
    """The device with its hardware's name: 'cuda (NVIDIA H100 80GB HBM3)', 'cpu (AMD EPYC,
    2 threads)'; just the type where the name is not known. ``threads``: the CPU's intra-op
    threads (default: torch's current setting)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type != "cpu":
        return str(device)
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        line = ""
    model = line.split(":", 1)[-1].strip()
    threads = torch.get_num_threads() if threads is None else threads
    return f"cpu ({model}, {threads} thread{'' if threads == 1 else 's'})" if model else "cpu"


def free_memory_bytes(device: torch.device) -> int:
    """What the device can still give: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # no /proc (macOS, BSD): the free pages, or where that is not kept, all of them
        pages = os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        pages = os.sysconf("SC_PHYS_PAGES")
    return pages * os.sysconf("SC_PAGE_SIZE")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast
    is much faster than fp32 rather than emulated and slower."""
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if all(hasattr(cpu, name) for name in probes):
        return any(getattr(cpu, name)() for name in probes)
    try:  # older torch: ask the kernel
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 autocast where the hardware computes in bf16 natively: CUDA GPUs that
    support it, and CPUs with AVX-512 BF16 or AMX. Elsewhere, and for 'fp32', float32.

    Measured on a 2-core AVX-512 BF16 CPU (benchmarks/RESULTS.md): the tutorial recipe
    trains 1.18x faster with the same test accuracy over 8 seeds, ResNet-20 1.3-3x, and
    EfficientNet-Lite0 computes features 1.9x faster. Weights, optimizer state and the loss
    stay float32.
    """
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"unknown precision '{name}'; choose auto, fp32 or bf16")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast where asked for, a no-op context for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(model: torch.nn.Module, device: torch.device) -> bool:
    """NHWC memory layout for convolutional models: faster on GPUs, and on this project's
    2-core AVX-512 CPU too (oneDNN's NHWC kernels): training 1.3x (seed-cnn 6,521 -> 8,517
    images/s at batch 256, ResNet-20 700 -> 946), EfficientNet-Lite0 inference 2x; on a
    2-core AVX2 CPU a seed-cnn step at batch 32 takes 12.7-14.7 ms against 17.8-21.1."""
    del device  # every device measured so far benefits
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def inference_batch_size(limit: int, image_size: tuple[int, int], device: torch.device) -> int:
    """Evaluation batch: up to ``limit`` on a GPU; on a CPU about a megapixel per batch
    (20 images of 224x224, 1,000 of 28x28), where larger batches only thrash the caches."""
    if device.type == "cuda":
        return limit
    h, w = image_size
    return min(limit, max(16, (1 << 20) // (h * w)))


_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """Keep glibc malloc from mapping and unmapping every activation buffer.

    glibc serves allocations above its mmap threshold (128 KiB at first) with fresh mmap()ed
    pages and returns them on free, so each training step of a small CNN page-faults its
    few-MB activations in again. The threshold only rises once a larger block is freed
    (the first validation pass does that), which made the first epoch of the tutorial
    recipe 1.6x slower than the next (8.5 vs 5.2 ms/step, measured). A fixed 32 MiB
    threshold (glibc's maximum) and a 64 MiB trim threshold remove that. Linux/glibc only;
    set CNNKIT_NO_MALLOPT=1 to leave the allocator alone.
    """
    global _ALLOCATOR_TUNED
    import os
    import sys

    if (
        _ALLOCATOR_TUNED
        or not sys.platform.startswith("linux")
        or os.environ.get("CNNKIT_NO_MALLOPT")
    ):
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 64 << 20)
    except (OSError, AttributeError):
        pass  # not glibc (musl, ...): nothing to tune


def precision_label(asked: str, dtype: torch.dtype, device: torch.device) -> str:
    """'float32' or 'bf16 autocast', saying why when 'auto' chose, and warning when bf16 is
    asked for on a CPU that only emulates it (measured 10x slower per step on AVX2)."""
    slow_cpu_bf16 = device.type == "cpu" and not cpu_has_native_bf16()
    if dtype == torch.float32:
        if asked == "auto" and slow_cpu_bf16:
            return "float32 (auto: this CPU has no native bf16)"
        return "float32"
    if asked == "auto":
        return "bf16 autocast (auto: native bf16 here; --precision fp32 for float32)"
    if slow_cpu_bf16:
        return (
            "bf16 autocast (warning: this CPU has no native bf16, so it is emulated and "
            "several times slower; --precision auto picks float32 here)"
        )
    return "bf16 autocast"


@dataclasses.dataclass(frozen=True)
class World:
    """The processes a run trains in: one, or a data-parallel group joined through
    torch.distributed (train/distributed.py makes it). ``rank`` 0 is the one writer."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # on this machine
    local_size: int = 1  # processes on this machine
    backend: str | None = None  # 'gloo' or 'nccl' when distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


@dataclasses.dataclass(frozen=True)
class ExecutionContext:
    """How a run computes, decided once: every part of a run asks this object rather than
    deciding again (and perhaps differently) from the settings."""

    device: torch.device
    dtype: torch.dtype  # float32, or bfloat16 under autocast
    precision: str  # what was asked (auto, fp32, bf16): the header says why dtype follows
    channels_last: bool  # NHWC activations (convolutional models)
    compile: bool  # torch.compile the training forward
    eval_batch: int  # images per batch in validation, evaluation and prediction
    eval_batch_limit: int  # the setting eval_batch came from (feature vectors use it as is)
    threads: int  # intra-op threads on the CPU
    world: World = World()  # the processes training together (one unless distributed)

    @classmethod
    def resolve(
        cls,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        compile: bool = False,
        eval_batch_size: int = 1000,
        model: torch.nn.Module | None = None,
        image_size: tuple[int, int] | None = None,
        world: World | None = None,
    ) -> ExecutionContext:
        """The context for ``model`` on images of ``image_size`` (H, W), from the settings
        (train.device, train.precision, train.compile, train.eval_batch_size)."""
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        eval_batch = eval_batch_size
        if image_size is not None:
            eval_batch = inference_batch_size(eval_batch_size, tuple(image_size), dev)
        return cls(
            device=dev,
            dtype=resolve_precision(precision, dev),
            precision=precision,
            channels_last=model is not None and use_channels_last(model, dev),
            compile=compile,
            eval_batch=eval_batch,
            eval_batch_limit=eval_batch_size,
            threads=torch.get_num_threads(),
            world=world or World(),
        )

    def for_features(self) -> ExecutionContext:
        """The same context for a head trained on feature vectors (N, D): no image layout,
        and batches of the setting's size (a vector is not a megapixel)."""
        return dataclasses.replace(self, channels_last=False, eval_batch=self.eval_batch_limit)

    def autocast(self):
        """bf16 autocast where the context computes in bf16, else a no-op context."""
        return autocast(self.device, self.dtype)

    def describe(self) -> str:
        """For the run header: 'cpu (AMD EPYC, 2 threads) float32 (auto: ...)'."""
        where = describe(self.device, self.threads)
        text = f"{where} {precision_label(self.precision, self.dtype, self.device)}"
        extras = [
            name
            for name, on in (("channels_last", self.channels_last), ("torch.compile", self.compile))
            if on
        ]
        return text + (f", {', '.join(extras)}" if extras else "")
