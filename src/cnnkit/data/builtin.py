"""Built-in data sets: MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100.

Each is read from its original distribution files (gzip'd IDX for the MNIST family, the
"python version" tarball for CIFAR). A file is used only after its checksum matches.
Where to look, in order:

1. an explicit ``data_dir``;
2. each directory in ``$CNNKIT_DATA`` (``os.pathsep``-separated), as ``<dir>/<name>/``;
3. ``/usr/share/datasets/<name>/`` (where Debian's ``dataset-*`` packages install);
4. the user cache, ``$XDG_CACHE_HOME/cnnkit/datasets/<name>/`` (``~/.cache/...``);
5. the official mirrors, downloaded into the cache with an atomic write.

Set ``CNNKIT_OFFLINE=1`` to skip step 5.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DOWNLOAD_TIMEOUT_S = 30


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are neither on disk nor downloadable."""


class ChecksumError(ValueError):
    """A file's content differs from the official release."""


@dataclass(frozen=True)
class ReleaseFile:
    """One file of an official release and the checksums that identify it."""

    name: str
    md5: str  # of the file as the publisher distributes it
    # sha256 of the decompressed content: lets us accept copies that a redistributor
    # recompressed (Debian's dataset-fashion-mnist), whose gzip bytes and md5 differ.
    content_sha256: str | None = None


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    title: str
    shape: tuple[int, int, int]  # C, H, W
    classes: tuple[str, ...]
    files: tuple[ReleaseFile, ...]
    mirrors: tuple[str, ...]
    parse: Callable[[dict[str, Path]], RawSplits]
    also_look_in: tuple[str, ...] = ()  # other folder names people use (torchvision's)


@dataclass
class RawSplits:
    """Official train and test arrays: uint8 images (N, C, H, W), int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


# ---------------------------------------------------------------- parsing


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzip'd) IDX file: uint8 images (N, H, W) or labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(
            f"{path}: IDX header promises {dims} ({expected} bytes) "
            f"but holds {len(data) - offset}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _parse_idx_release(files: dict[str, Path], classes: tuple[str, ...]) -> RawSplits:
    def images(name: str) -> np.ndarray:
        return read_idx(files[name])[:, None, :, :]  # add the channel axis

    def labels(name: str) -> np.ndarray:
        return read_idx(files[name]).astype(np.int64)

    return RawSplits(
        images("train-images-idx3-ubyte.gz"),
        labels("train-labels-idx1-ubyte.gz"),
        images("t10k-images-idx3-ubyte.gz"),
        labels("t10k-labels-idx1-ubyte.gz"),
        list(classes),
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches, which hold only dicts, lists, bytes and numpy arrays.

    Anything else in the stream (arbitrary callables) is refused, so even a file that got
    past the checksum cannot run code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _unpickle(data: bytes) -> dict:
    obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar(tarball: Path) -> RawSplits:
    """Read CIFAR-10 or CIFAR-100 from the official python-version tarball."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

        def load(name: str) -> dict:
            if name not in members:
                raise ValueError(f"{tarball}: no '{name}' inside; is this a CIFAR tarball?")
            return _unpickle(tar.extractfile(members[name]).read())

        if "batches.meta" in members:  # CIFAR-10
            classes = [c.decode() for c in load("batches.meta")["label_names"]]
            train = [load(f"data_batch_{i}") for i in range(1, 6)]
            test = [load("test_batch")]
            key = "labels"
        elif "meta" in members:  # CIFAR-100: 100 fine labels (20 coarse ones ignored)
            classes = [c.decode() for c in load("meta")["fine_label_names"]]
            train, test, key = [load("train")], [load("test")], "fine_labels"
        else:
            raise ValueError(f"{tarball}: neither CIFAR-10 nor CIFAR-100 layout")

    def stack(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        images = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
        return images.reshape(-1, 3, 32, 32), labels  # rows are R-plane, G, B: already CHW

    train_x, train_y = stack(train)
    test_x, test_y = stack(test)
    return RawSplits(train_x, train_y, test_x, test_y, classes)


# ---------------------------------------------------------------- the catalogue

_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# md5: the publishers' values (also torchvision's). content_sha256: computed from files whose
# md5 matched; for the Fashion-MNIST images, from Debian's recompressed copies, whose labels
# decompress byte-identical to the official label files.
BUILTINS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in [
        BuiltinDataset(
            name="mnist",
            title="MNIST handwritten digits",
            shape=(1, 28, 28),
            classes=tuple(str(i) for i in range(10)),
            files=(
                ReleaseFile(
                    "train-images-idx3-ubyte.gz",
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                ),
                ReleaseFile(
                    "train-labels-idx1-ubyte.gz",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                ),
                ReleaseFile(
                    "t10k-images-idx3-ubyte.gz",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                ),
                ReleaseFile(
                    "t10k-labels-idx1-ubyte.gz",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                ),
            ),
            mirrors=_MNIST_MIRRORS,
            parse=lambda files: _parse_idx_release(files, BUILTINS["mnist"].classes),
            also_look_in=("MNIST/raw",),
        ),
        BuiltinDataset(
            name="fashion-mnist",
            title="Fashion-MNIST (Zalando article images)",
            shape=(1, 28, 28),
            classes=_FASHION_CLASSES,
            files=(
                ReleaseFile(
                    "train-images-idx3-ubyte.gz",
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                ),
                ReleaseFile(
                    "train-labels-idx1-ubyte.gz",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                ),
                ReleaseFile(
                    "t10k-images-idx3-ubyte.gz",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                ),
                ReleaseFile(
                    "t10k-labels-idx1-ubyte.gz",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                ),
            ),
            mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            parse=lambda files: _parse_idx_release(files, _FASHION_CLASSES),
            also_look_in=("FashionMNIST/raw",),
        ),
        BuiltinDataset(
            name="cifar10",
            title="CIFAR-10 tiny colour images",
            shape=(3, 32, 32),
            classes=_CIFAR10_CLASSES,
            files=(ReleaseFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            parse=lambda files: read_cifar(files["cifar-10-python.tar.gz"]),
        ),
        BuiltinDataset(
            name="cifar100",
            title="CIFAR-100 tiny colour images (100 fine classes)",
            shape=(3, 32, 32),
            classes=(),  # read from the tarball's meta file
            files=(ReleaseFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            parse=lambda files: read_cifar(files["cifar-100-python.tar.gz"]),
        ),
    ]
}


def builtin(name: str) -> BuiltinDataset:
    """The catalogue entry for a built-in data set name (case and '_' tolerant)."""
    key = name.lower().replace("_", "-")
    key = {"fashion": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(
        key, key
    )
    key = "cifar100" if key == "cifar-100" else key
    if key not in BUILTINS:
        raise KeyError(
            f"unknown built-in data set '{name}'; choose one of: {', '.join(BUILTINS)} "
            "(or pass a folder of images)"
        )
    return BUILTINS[key]


# ---------------------------------------------------------------- locating and verifying


def user_cache_dir() -> Path:
    """cnnkit's folder in the user cache: ``$XDG_CACHE_HOME/cnnkit`` (``~/.cache/cnnkit``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnkit"


def cache_dir() -> Path:
    return user_cache_dir() / "datasets"


def data_roots() -> list[Path]:
    """The directories listed in ``$CNNKIT_DATA``, in order."""
    return [Path(p) for p in os.environ.get("CNNKIT_DATA", "").split(os.pathsep) if p]


def search_dirs(spec: BuiltinDataset, data_dir: str | Path | None = None) -> list[Path]:
    """Every directory that may hold the data set's files, in the order they are tried."""
    roots: list[Path] = []
    if data_dir:
        roots.append(Path(data_dir))
    roots += data_roots()
    dirs: list[Path] = []
    for root in roots:
        # An explicit/CNNKIT_DATA directory may be the data set's own folder or a parent.
        dirs += [root / spec.name, *(root / sub for sub in spec.also_look_in), root]
    dirs += [Path("/usr/share/datasets") / spec.name, cache_dir() / spec.name]
    return list(dict.fromkeys(dirs))  # drop repeats, keep order


def _digest(path: Path, algorithm: str, decompress: bool = False) -> str:
    h = hashlib.new(algorithm)
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, release: ReleaseFile) -> None:
    """Raise ChecksumError unless ``path`` holds exactly the official ``release`` file."""
    if _digest(path, "md5") == release.md5:
        return
    if release.content_sha256 and path.suffix == ".gz":
        try:
            if _digest(path, "sha256", decompress=True) == release.content_sha256:
                return
        except (OSError, EOFError):
            pass  # not valid gzip: reported below
    raise ChecksumError(
        f"{path}: checksum mismatch, this is not the official '{release.name}' "
        f"(expected md5 {release.md5}). The file is corrupt, truncated or a different "
        "version; delete it and let cnnkit download it again, or replace it with the "
        "official file."
    )


def _download(url: str, dest: Path, release: ReleaseFile) -> None:
    """Download to a temporary file beside ``dest``, verify, then rename into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
        ):
            while chunk := response.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        verify(Path(tmp), release)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def locate(spec: BuiltinDataset, data_dir: str | Path | None = None) -> dict[str, Path]:
    """Find (or download) every file of the data set and verify it; return name -> path."""
    dirs = search_dirs(spec, data_dir)
    found: dict[str, Path] = {}
    for release in spec.files:
        for d in dirs:
            if (d / release.name).is_file():
                verify(d / release.name, release)  # a bad file is refused, never skipped over
                found[release.name] = d / release.name
                break
    missing = [r for r in spec.files if r.name not in found]
    if not missing:
        return found

    offline = os.environ.get("CNNKIT_OFFLINE", "") not in ("", "0")
    errors: list[str] = []
    if not offline:
        for release in missing:
            dest = cache_dir() / spec.name / release.name
            for mirror in spec.mirrors:
                try:
                    _download(mirror + release.name, dest, release)
                    found[release.name] = dest
                    break
                except (urllib.error.URLError, OSError, ChecksumError) as e:
                    errors.append(f"{mirror}{release.name}: {getattr(e, 'reason', e)}")
            if release.name not in found:
                break  # every mirror failed: the others would fail the same way
        missing = [r for r in missing if r.name not in found]
    if not missing:
        return found

    names = ", ".join(r.name for r in missing)
    lines = [f"data set '{spec.name}' not found: missing {names}.", "Looked in:"]
    lines += [f"  {d}" for d in dirs]
    if offline:
        lines.append("Download skipped: CNNKIT_OFFLINE is set.")
    else:
        lines.append("Download failed:")
        lines += [f"  {e}" for e in errors]
    lines.append(
        f"Fix: put the official files in a folder '{spec.name}/' inside a directory listed in "
        f"CNNKIT_DATA (or pass --data-dir), e.g. from {spec.mirrors[0]}{missing[0].name}"
    )
    raise DatasetNotFoundError("\n".join(lines))


def is_available(spec: BuiltinDataset, data_dir: str | Path | None = None) -> Path | None:
    """The directory holding all the data set's files, without verifying or downloading."""
    for d in search_dirs(spec, data_dir):
        if all((d / r.name).is_file() for r in spec.files):
            return d
    return None


def load_builtin(name: str, data_dir: str | Path | None = None) -> RawSplits:
    """Locate, verify and parse a built-in data set.

    Parsed arrays are kept for the two most recent sets of files (keyed by path, size and
    modification time), so evaluating right after training does not decompress them again.
    """
    spec = builtin(name)
    files = locate(spec, data_dir)
    key = tuple((n, str(p), p.stat().st_size, p.stat().st_mtime_ns) for n, p in files.items())
    return _parse_cached(spec.name, key)


@functools.lru_cache(maxsize=2)
def _parse_cached(name: str, key: tuple) -> RawSplits:
    raw = BUILTINS[name].parse({n: Path(p) for n, p, _, _ in key})
    for a in (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels):
        a.flags.writeable = False  # shared between callers: nobody may change it
    return raw
