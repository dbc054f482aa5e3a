"""The data-set doctor: what is wrong with a folder of images, before training on it.

``check_dataset(path)`` reads every file once (in worker processes) and reports, by
severity: a data set with no image at all (empty class folders, a list with a header
only); entries that are no readable file (dangling or looping links, FIFOs, devices);
list rows pointing outside the list's folder; files that cannot be decoded; classes with
too few images; class imbalance; tiny or extremely elongated images; modes that need
conversion (CMYK, 16-bit, palette, alpha); exact duplicates (same bytes) and near
duplicates (perceptual hash), above all the ones that sit in two splits: a test image that
is also a training image inflates accuracy.

``cnnkit train`` runs ``quick_check`` (counts, imbalance, exact duplicates across splits),
which costs a read of the files and no decoding.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnkit.progress import progress

from .decode import ImageReadError, open_image
from .folder import (
    FileList,
    display_name,
    list_images,
    map_in_workers,
    no_images_problem,
    not_a_file,
)
from .multilabel import targets_of

MIN_PER_CLASS = 10  # fewer training images than this per class rarely gives a usable model
IMBALANCE_RATIO = 3.0  # largest / smallest class above this: consider --class-weights auto
TINY_SIDE = 32  # pixels
EXTREME_ASPECT = 4.0
NEAR_DUPLICATE_BITS = 4  # of 64: differences this small are re-encodes, resizes, crops
ODD_MODES = {
    "CMYK": "CMYK",
    "I;16": "16-bit",
    "I;16B": "16-bit",
    "I;16L": "16-bit",
    "I": "32-bit integer",
    "F": "32-bit float",
    "P": "palette",
    "PA": "palette+alpha",
    "RGBA": "alpha channel",
    "LA": "alpha channel",
    "1": "1-bit",
}


@dataclass
class Finding:
    level: str  # error | warning | info
    check: str
    message: str
    files: list[str] = field(default_factory=list)


@dataclass
class FileFacts:
    path: str
    split: str
    label: int
    sha1: str
    width: int = 0
    height: int = 0
    mode: str = ""
    dhash: int | None = None
    error: str = ""


@dataclass
class DoctorReport:
    root: str
    classes: list[str]
    counts: dict[str, list[int]]  # split -> images per class
    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "classes": self.classes,
            "counts": self.counts,
            "findings": [asdict(f) for f in self.findings],
        }


def difference_hash(im) -> int:
    """64-bit dHash: is each pixel of a 9x8 greyscale thumbnail brighter than its left
    neighbour. Robust to re-encoding, resizing and small colour changes."""
    from PIL import Image

    a = np.asarray(im.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def _examine(path: Path, split: str, label: int) -> FileFacts:
    data = path.read_bytes() if path.is_file() else b""
    # Shown as valid text (undecodable name bytes as escapes), as class names are.
    facts = FileFacts(display_name(str(path)), split, label, hashlib.sha1(data).hexdigest())
    why = not_a_file(path)  # the listing leaves these out; never open one (a FIFO blocks)
    if why:
        facts.error = display_name(f"{path}: {why}")
        return facts
    try:
        im = open_image(path, draft=64)  # keeps the file's mode (the draft is RGB/L only)
        facts.mode = im.mode
        facts.width, facts.height = im.size
        facts.dhash = difference_hash(im)
    except ImageReadError as e:
        facts.error = display_name(str(e))
    except Exception as e:
        facts.error = display_name(f"{path}: cannot decode image ({type(e).__name__}: {e})")
    return facts


def _examine_bytes(name: str, split: str, label: int, data: bytes) -> FileFacts:
    """FileFacts of an image held in memory (a sample of a shard)."""
    facts = FileFacts(name, split, label, hashlib.sha1(data).hexdigest())
    try:
        im = open_image(data, draft=64)
        facts.mode = im.mode
        facts.width, facts.height = im.size
        facts.dhash = difference_hash(im)
    except ImageReadError as e:
        facts.error = f"{name}: {str(e).removeprefix('image data: ')}"
    except Exception as e:
        facts.error = f"{name}: cannot decode image ({type(e).__name__}: {e})"
    return facts


def examine_files(items: list[tuple[Path, str, int]], workers: int | None = None):
    return list(map_in_workers(_examine, items, workers, chunk=32, label="examining"))


def _clusters(pairs: list[tuple[int, int]], n: int) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def near_duplicate_pairs(hashes: list[int | None], max_bits: int) -> list[tuple[int, int]]:
    """Pairs of hashes within ``max_bits`` of each other.

    The 64 bits are cut into 8 bands of 8: two hashes that differ in at most 7 bits agree on
    at least one band (pigeonhole), so only pairs sharing a band are compared.
    """
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        if h is not None:
            for band in range(8):
                buckets[(band, (h >> (8 * band)) & 0xFF)].append(i)
    pairs = set()
    for members in buckets.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                a, b = members[x], members[y]
                if bin(hashes[a] ^ hashes[b]).count("1") <= max_bits:
                    pairs.add((a, b))
    return sorted(pairs)


def _duplicate_findings(facts: list[FileFacts], root: Path, max_bits: int) -> list[Finding]:
    def rel(f: FileFacts) -> str:
        p = Path(f.path)
        return str(p.relative_to(root)) if p.is_relative_to(root) else f.path

    findings = []
    by_sha = defaultdict(list)
    for i, f in enumerate(facts):
        if not f.error:
            by_sha[f.sha1].append(i)
    exact = [g for g in by_sha.values() if len(g) > 1]
    exact_pairs = {(a, b) for g in exact for a in g for b in g if a < b}
    near = [
        p for p in near_duplicate_pairs([f.dhash for f in facts], max_bits) if p not in exact_pairs
    ]
    for kind, groups in (("exact", exact), ("near", _clusters(near, len(facts)))):
        crossing = [g for g in groups if len({facts[i].split for i in g}) > 1]
        within = [g for g in groups if g not in crossing]
        what = "identical files" if kind == "exact" else "near-identical images (perceptual hash)"
        if crossing:
            findings.append(
                Finding(
                    "error",
                    f"{kind}-duplicates-across-splits",
                    f"{len(crossing)} group(s) of {what} appear in more than one split: the model "
                    "is evaluated on images it trained on, which inflates accuracy. Keep one copy.",
                    [
                        " = ".join(f"{rel(facts[i])} [{facts[i].split}]" for i in g)
                        for g in crossing
                    ],
                )
            )
        if within:
            findings.append(
                Finding(
                    "warning",
                    f"{kind}-duplicates",
                    f"{len(within)} group(s) of {what} within a split (over-weighted in training)",
                    [" = ".join(rel(facts[i]) for i in g) for g in within],
                )
            )
        labels = [g for g in groups if len({facts[i].label for i in g}) > 1]
        if labels:
            findings.append(
                Finding(
                    "error",
                    f"{kind}-duplicates-with-different-labels",
                    f"{len(labels)} group(s) of {what} carry different labels",
                    [" = ".join(rel(facts[i]) for i in g) for g in labels],
                )
            )
    return findings


def _count_findings(counts: dict[str, list[int]], classes: list[str]) -> list[Finding]:
    findings = []
    train = counts.get("train") or counts.get("all") or []
    if train:
        few = [f"{c}: {n}" for c, n in zip(classes, train, strict=True) if n < MIN_PER_CLASS]
        if few:
            findings.append(
                Finding(
                    "error" if min(train) == 0 else "warning",
                    "few-images",
                    f"{len(few)} class(es) with fewer than {MIN_PER_CLASS} training images; "
                    "collect more, or merge or drop the class",
                    few,
                )
            )
        if min(train) > 0 and max(train) / min(train) > IMBALANCE_RATIO:
            findings.append(
                Finding(
                    "warning",
                    "imbalance",
                    f"classes are imbalanced: {max(train)} vs {min(train)} training images "
                    f"(ratio {max(train) / min(train):.1f}); accuracy will favour the large "
                    "classes. Consider --class-weights auto or --sampler balanced, and read the "
                    "per-class recall.",
                )
            )
    for split, row in counts.items():
        empty = [c for c, n in zip(classes, row, strict=True) if n == 0]
        if empty and split != "train":
            findings.append(
                Finding(
                    "warning",
                    "empty-class-in-split",
                    f"the {split} split has no images of {', '.join(empty)}",
                )
            )
    return findings


def _count(files: dict[str, list[tuple[Path, int]]], k: int) -> dict[str, list[int]]:
    """Images per class of each split; multi-label (label tuples): images holding each."""
    out = {}
    for s, fs in files.items():
        flat = [c for _, lb in fs for c in (lb if isinstance(lb, tuple) else (lb,))]
        out[s] = np.bincount(np.asarray(flat, dtype=np.int64), minlength=k).tolist()
    return out


def _outside(root: Path, paths: list[Path]) -> list[Path]:
    """The paths that lie outside ``root``, by their text (``../`` resolved, links not)."""
    top = os.path.normpath(os.path.abspath(root))
    return [
        p for p in paths if os.path.commonpath([top, os.path.normpath(os.path.abspath(p))]) != top
    ]


def _listing_findings(listing: FileList) -> list[Finding]:
    """What listing the files showed: no images at all, entries that are no readable file,
    files that are not images, list rows that point outside the list's folder."""
    findings = []
    empty = no_images_problem(listing)
    if empty:
        findings.append(Finding("error", "no-images", empty))
    if listing.skipped:
        findings.append(
            Finding(
                "warning",
                "not-regular-files",
                f"{len(listing.skipped)} entr(ies) are not readable files (dangling or looping "
                "symbolic links, FIFOs, devices) and are skipped; fix or remove them",
                [f"{display_name(str(p))} ({why})" for p, why in listing.skipped],
            )
        )
    if listing.ignored:
        findings.append(
            Finding(
                "info",
                "not-images",
                f"{len(listing.ignored)} file(s) ignored (not image files)",
                [f"{display_name(str(p))} ({why})" for p, why in listing.ignored],
            )
        )
    if listing.list_file is not None:
        listed = [p for fs in listing.splits.values() for p, _ in fs]
        outside = _outside(listing.root, listed)
        if outside:
            findings.append(
                Finding(
                    "info",
                    "outside-list-folder",
                    f"{len(outside)} listed file(s) lie outside the list's folder "
                    f"{display_name(str(listing.root))} (absolute or ../ paths); they are used, "
                    "but moving the folder with its list will not take them along",
                    [display_name(str(p)) for p in outside],
                )
            )
    return findings


def check_dataset(
    path: str | Path, near_bits: int = NEAR_DUPLICATE_BITS, workers: int | None = None
) -> DoctorReport:
    """Every check, on every file (see the module docstring); on every sample of a shard
    set (cnnkit datasets pack) too."""
    from .shards import is_shard_set

    if is_shard_set(str(path)):
        return check_shards(str(path), near_bits)
    listing = list_images(path)
    root, classes = listing.root, listing.classes
    files = dict(listing.splits)  # a pool stays one split: duplicates in it leak on splitting
    items = [(p, split, lb) for split, fs in files.items() for p, lb in fs]
    facts = examine_files(items, workers)
    multilabel = any(fs and isinstance(fs[0][1], tuple) for fs in files.values())
    counts, findings = _examined(facts, classes, root, near_bits, per_class=not multilabel)
    if multilabel:  # label sets: frequencies, rare labels, co-occurrence (not class balance)
        targets = {
            split: torch.from_numpy(targets_of([labels for _, labels in fs], len(classes)))
            for split, fs in files.items()
        }
        findings += multilabel_findings(classes, targets)
    findings = _by_level(_listing_findings(listing) + findings)
    return DoctorReport(str(root), classes, counts, findings)


def check_shards(name: str, near_bits: int = NEAR_DUPLICATE_BITS) -> DoctorReport:
    """The same checks on a shard set: every sample read, decoded and hashed (named
    '<shard>:<key>'), and the counts as the samples are, not as the index says."""
    from .shards import iter_shard, read_shard_set

    shards = read_shard_set(name)
    facts = []
    total = sum(part.count for part in shards.splits.values())
    with progress("examining", total, "samples") as advance:
        for split, part in shards.splits.items():
            for url in part.urls:
                shard = url.rstrip("/").rsplit("/", 1)[-1]
                for key, data, label in iter_shard(url):
                    facts.append(_examine_bytes(f"{shard}:{key}", split, label, data))
                    advance(1)
    counts, findings = _examined(facts, shards.classes, Path(shards.location), near_bits)
    return DoctorReport(shards.location, shards.classes, counts, findings)


def _examined(
    facts: list[FileFacts], classes: list[str], root: Path, near_bits: int, per_class=True
) -> tuple[dict[str, list[int]], list[Finding]]:
    """(images per class of each split, the findings) of examined files or samples;
    ``per_class`` False (multi-label): without the class-balance findings."""
    findings: list[Finding] = []
    broken = [f for f in facts if f.error]
    if broken:
        findings.append(
            Finding(
                "error",
                "unreadable",
                f"{len(broken)} file(s) cannot be decoded; training skips them",
                [f.error for f in broken],
            )
        )
    ok = [f for f in facts if not f.error]
    tiny = [f"{f.path} ({f.width}x{f.height})" for f in ok if min(f.width, f.height) < TINY_SIDE]
    if tiny:
        findings.append(
            Finding(
                "warning",
                "tiny",
                f"{len(tiny)} image(s) smaller than {TINY_SIDE} px on a side",
                tiny,
            )
        )
    long = [
        f"{f.path} ({f.width}x{f.height})"
        for f in ok
        if max(f.width, f.height) / max(1, min(f.width, f.height)) > EXTREME_ASPECT
    ]
    if long:
        findings.append(
            Finding(
                "warning",
                "extreme-aspect",
                f"{len(long)} image(s) more than {EXTREME_ASPECT:g}:1; the "
                "centre crop will cut most of them away",
                long,
            )
        )
    modes = Counter(ODD_MODES[f.mode] for f in ok if f.mode in ODD_MODES)
    if modes:
        findings.append(
            Finding(
                "info",
                "modes",
                "images converted to RGB when loaded: "
                + ", ".join(f"{n} {m}" for m, n in modes.most_common()),
            )
        )
    ok_files = defaultdict(list)
    for f in ok:
        ok_files[f.split].append((Path(f.path), f.label))
    counts = _count(ok_files, len(classes))
    if per_class:
        findings += _count_findings(counts, classes)
    findings += _duplicate_findings(facts, root, near_bits)
    return counts, _by_level(findings)


def _by_level(findings: list[Finding]) -> list[Finding]:
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f.level])  # stable: in order within a level


RARE_LABEL = 10  # training images a label needs, at least, to be learnt at all


def multilabel_findings(classes: list[str], targets: dict[str, torch.Tensor]) -> list[Finding]:
    """A multi-label set's labels, from each split's (N, K) 0/1 matrix (``train``, or
    ``all`` before splitting): how often each is present, the labels too rare to learn,
    those missing from the validation or test split, the most frequent pairs, and images
    with no label."""
    name = "train" if "train" in targets else "all"
    train = targets[name].float()
    counts = train.sum(0).long().tolist()
    order = sorted(range(len(counts)), key=lambda k: -counts[k])
    shown = ", ".join(f"{classes[k]} {counts[k]:,}" for k in order[:12])
    more = f" (and {len(order) - 12} more)" if len(order) > 12 else ""
    what = "training images" if name == "train" else "images"
    findings = [Finding("info", "labels", f"{what} per label: {shown}{more}")]
    rare = [classes[k] for k in order if counts[k] < RARE_LABEL]
    if rare:
        findings.append(
            Finding(
                "warning",
                "rare-labels",
                f"{len(rare)} label(s) on fewer than {RARE_LABEL} {what}, too few to "
                f"learn: {', '.join(rare[:10])}; add images or remove the label",
            )
        )
    for split in ("val", "test"):
        part = targets.get(split)
        if part is not None and len(part):
            missing = [classes[k] for k, n in enumerate(part.sum(0)) if n == 0]
            if missing:
                findings.append(
                    Finding(
                        "info",
                        "split-labels",
                        f"{split} split has no image with: {', '.join(missing[:10])} (their "
                        "AP cannot be measured there)",
                    )
                )
    pairs = (train.T @ train).long()
    pairs.fill_diagonal_(0)
    top = sorted(
        ((int(pairs[i, j]), i, j) for i in range(len(counts)) for j in range(i + 1, len(counts))),
        reverse=True,
    )[:5]
    if top and top[0][0]:
        together = ", ".join(f"{classes[i]}+{classes[j]} {n:,}" for n, i, j in top if n)
        findings.append(Finding("info", "co-occurrence", f"labels most often together: {together}"))
    empty = int((train.sum(1) == 0).sum())
    if empty:
        findings.append(Finding("info", "no-label", f"{empty:,} {what} have no label (allowed)"))
    return findings


def quick_check(data) -> list[Finding]:
    """The cheap checks on a loaded folder data set: counts, imbalance, and files with the
    same bytes in two splits (a read of the files, no decoding)."""
    if data.files is None:
        return []
    if data.multilabel:
        parts = {s: data.split(s).labels for s in ("train", "val", "test") if data.count(s)}
        return multilabel_findings(data.classes, parts)
    root = Path(data.root)
    files = {s: [(root / f, lb) for f, lb in fs] for s, fs in data.files.items()}
    findings = _count_findings(_count(files, len(data.classes)), data.classes)
    seen: dict[str, tuple[str, str]] = {}
    leaks = []
    for split, fs in files.items():
        for p, _ in fs:
            digest = hashlib.sha1(p.read_bytes()).hexdigest()
            if digest in seen and seen[digest][1] != split:
                leaks.append(
                    display_name(
                        f"{seen[digest][0]} [{seen[digest][1]}] = {p.relative_to(root)} [{split}]"
                    )
                )
            seen.setdefault(digest, (str(p.relative_to(root)), split))
    if leaks:
        findings.append(
            Finding(
                "error",
                "exact-duplicates-across-splits",
                f"{len(leaks)} file(s) appear in two splits; validation accuracy will be inflated. "
                "Run 'cnnkit datasets check' for near duplicates too.",
                leaks,
            )
        )
    return findings


__all__ = ["DoctorReport", "Finding", "check_dataset", "quick_check"]
