import pytest
import torch

from cnnkit import device as dev


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_follows_the_cpus_bf16_support(monkeypatch, native, expected):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert dev.resolve_precision("auto", cpu) == expected
    assert dev.resolve_precision("fp32", cpu) == torch.float32  # asking wins either way
    assert dev.resolve_precision("bf16", cpu) == torch.bfloat16


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose auto, fp32 or bf16"):
        dev.resolve_precision("fp16", torch.device("cpu"))


def test_native_bf16_probe_agrees_with_the_kernel():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to compare with")
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert dev.cpu_has_native_bf16() == native


@pytest.mark.parametrize(
    "asked, native, expected",
    [
        ("auto", False, "float32 (auto: this CPU has no native bf16)"),
        ("auto", True, "bf16 autocast (auto: native bf16 here"),
        ("bf16", False, "bf16 autocast (warning: this CPU has no native bf16"),
        ("bf16", True, "bf16 autocast"),
        ("fp32", True, "float32"),
    ],
)
def test_run_header_says_why_the_precision_and_warns_of_emulated_bf16(
    monkeypatch, asked, native, expected
):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    label = dev.precision_label(asked, dev.resolve_precision(asked, cpu), cpu)
    assert label.startswith(expected)
    assert ("warning" in label) == (asked == "bf16" and not native)


def test_describe_names_the_hardware(monkeypatch):
    cpu = dev.describe(torch.device("cpu"))
    assert cpu == "cpu" or (cpu.startswith("cpu (") and f"{torch.get_num_threads()} threads" in cpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA Test GPU")
    assert dev.describe(torch.device("cuda:1")) == "cuda:1 (NVIDIA Test GPU)"


def test_host_memory_without_proc_falls_back_to_sysconf(monkeypatch):
    real_open, real_sysconf = open, dev.os.sysconf

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc"):
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    def no_free_pages(name):  # as on macOS, which keeps no count of free pages
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return real_sysconf(name)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(dev.os, "sysconf", no_free_pages)
    expected = real_sysconf("SC_PHYS_PAGES") * real_sysconf("SC_PAGE_SIZE")
    assert dev.free_memory_bytes(torch.device("cpu")) == expected


def test_the_execution_context_is_resolved_once_and_printed_in_the_run_header(monkeypatch):
    from cnnkit.models import create_model

    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    model = create_model("seed-cnn", 10, 1, (28, 28))
    ctx = dev.ExecutionContext.resolve(
        device="cpu", precision="auto", eval_batch_size=1000, model=model, image_size=(28, 28)
    )
    assert ctx.dtype == torch.float32 and ctx.channels_last and not ctx.compile
    assert ctx.eval_batch == dev.inference_batch_size(1000, (28, 28), ctx.device)
    header = ctx.describe()
    assert header.startswith("cpu") and "float32 (auto: this CPU has no native bf16)" in header
    assert header.endswith(", channels_last")
    features = ctx.for_features()  # a head on feature vectors: no layout, the setting's batch
    assert not features.channels_last and features.eval_batch == 1000
    dense = dev.ExecutionContext.resolve(device="cpu", model=torch.nn.Linear(4, 2))
    assert not dense.channels_last and "channels_last" not in dense.describe()
