"""datasets, cache, models and bench: what cnnkit has to work with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import _console, _table
from .evaluation import _audit


def cmd_datasets(args) -> int:
    from cnnkit.data import BUILTINS, builtin, is_available, load_dataset

    con = _console()
    if args.action == "list":
        t = _table("built-in data sets", "name", "what", "image", "local copy", text_columns=4)
        for spec in BUILTINS.values():
            where = is_available(spec, args.data_dir)
            t.add_row(
                spec.name,
                spec.title,
                "x".join(map(str, spec.shape)),
                str(where) if where else f"no (downloads from {spec.mirrors[0]})",
            )
        con.print(t)
        con.print(
            "Search order: --data-dir, $CNNKIT_DATA, /usr/share/datasets, "
            "~/.cache/cnnkit/datasets, then download (unless CNNKIT_OFFLINE=1)."
        )
        return 0
    if args.action == "pack":
        return _pack(args, con)
    if args.action == "audit":
        if not args.name:
            raise ValueError("usage: cnnkit datasets audit DATA (a built-in name, folder or CSV)")
        out = args.audit_out or f"audit-{Path(args.name).name}"
        return _audit(args, _data_config(args), Path(out))
    if not args.name:
        raise ValueError(
            f"usage: cnnkit datasets {args.action} {'NAME' if args.action == 'info' else 'PATH'}"
        )
    if args.action == "check":
        return _check(args, con)
    if args.action == "preview":
        return _preview(args)
    spec = builtin(args.name)
    data = load_dataset(spec.name, data_dir=args.data_dir, val_split=0)
    con.print(f"[bold]{spec.name}[/]: {spec.title}")
    con.print(
        f"images {'x'.join(map(str, data.shape))} uint8; train {len(data.train):,}, "
        f"test {len(data.test):,}; mean {data.mean}, std {data.std} (training set)"
    )
    t = _table(None, "class", "index", "train", "test")
    import torch

    train_counts = torch.bincount(data.train.labels, minlength=len(data.classes)).tolist()
    test_counts = torch.bincount(data.test.labels, minlength=len(data.classes)).tolist()
    for i, name in enumerate(data.classes):
        t.add_row(name, str(i), f"{train_counts[i]:,}", f"{test_counts[i]:,}")
    con.print(t)
    return 0


def _pack(args, con) -> int:
    if not args.name or not args.out:
        raise ValueError(
            "usage: cnnkit datasets pack SRC OUT (SRC: a built-in name, folder or CSV list; "
            "OUT: a new or empty folder for the shards)"
        )
    from cnnkit.data.pack import pack

    index = pack(
        args.name,
        args.out,
        shard_size=args.shard_size,
        max_count=args.max_count,
        max_side=args.max_side,
        quality=args.quality,
        val_split=args.val_split,
        test_split=args.test_split,
        seed=args.seed,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(index, indent=2))
        return 0
    splits = index["splits"]
    t = _table(f"{args.out}: shards of {args.name}", "split", "images", "shards", "MB")
    for name, split in splits.items():
        size = sum(s["bytes"] for s in split["shards"])
        t.add_row(name, f"{split['count']:,}", str(len(split["shards"])), f"{size / 1e6:,.1f}")
    con.print(t)
    images = sum(s["count"] for s in splits.values())
    seconds = index["seconds"]
    con.print(
        f"{images:,} images in {sum(len(s['shards']) for s in splits.values())} shards, "
        f"{index['bytes'] / 1e6:,.1f} MB, in {seconds:.1f}s ({images / max(seconds, 1e-9):,.0f} "
        f"images/s); input {index['channels']}x{index['image_size']}x{index['image_size']}",
        markup=False,
    )
    skipped = index["skipped"]
    if skipped:
        con.print(f"skipped {len(skipped)} file(s) that could not be read:", markup=False)
        for s in skipped[:10]:
            con.print(f"    {s['file']}: {s['reason']}", markup=False, soft_wrap=True)
        if len(skipped) > 10:
            con.print(f"    ... and {len(skipped) - 10} more (index.json lists all)")
    return 0


def _check(args, con) -> int:
    from rich.markup import escape

    from cnnkit.data.doctor import check_dataset

    report = check_dataset(args.name, near_bits=args.near_bits)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 1 if report.errors else 0
    splits = list(report.counts)
    t = _table(f"{report.root}: images per class", "class", *splits)
    for i, name in enumerate(report.classes):
        t.add_row(name, *(f"{report.counts[s][i]:,}" for s in splits))
    con.print(t)
    style = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    for f in report.findings:
        con.print(
            f"[{style[f.level]}]{f.level}[/] {escape(f.check)}: {escape(f.message)}",
            soft_wrap=True,
        )
        for line in f.files[:5]:
            con.print(f"    {line}", markup=False, soft_wrap=True)
        if len(f.files) > 5:
            con.print(f"    ... and {len(f.files) - 5} more (--json lists all)")
    if not report.findings:
        con.print("no problems found")
    return 1 if report.errors else 0


def cmd_bench(args) -> int:
    from cnnkit.bench import bench, ratios

    results = bench(
        only=args.only.split(",") if args.only else None,
        seeds=args.seeds,
        epochs=args.epochs,
        keras_python=args.keras_python,
    )
    t = _table(
        "cnnkit bench (median over seeds, with the range)",
        "measurement",
        "runs",
        "train seconds",
        "images/s",
        "test accuracy (mean)",
        "tutorial's speed-up",
    )
    speedup = ratios(results)
    for name, r in results.items():
        compiling = r.get("compile_seconds_median")
        t.add_row(
            name,
            str(r["runs"]),
            f"{r['train_seconds_median']:.1f} ({r['train_seconds_min']:.1f}-"
            f"{r['train_seconds_max']:.1f})"
            + (f" + {compiling:.0f} s compiling" if compiling is not None else ""),
            f"{r['images_per_s_median']:,}",
            f"{r['test_accuracy_mean']:.2%} ({r['test_accuracy_min']:.2%}-"
            f"{r['test_accuracy_max']:.2%})",
            f"{speedup[name]:.2f}x" if name in speedup else "",
        )
    _console().print(t)
    return 0


def _size_text(size_bytes: int) -> str:
    for unit in ("B", "kB", "MB"):
        if size_bytes < 1000:
            return f"{size_bytes:,.0f} {unit}" if unit == "B" else f"{size_bytes:,.1f} {unit}"
        size_bytes /= 1000
    return f"{size_bytes:,.1f} GB"


def cmd_cache(args) -> int:
    from cnnkit.data.cache import cache_folders, cache_root, check_names, clear_cache

    if args.action == "list" and args.names:
        raise ValueError("usage: cnnkit cache [list] | cnnkit cache clear [NAME ...] [--yes]")
    check_names(args.names)  # before anything is measured, asked or deleted
    folders = cache_folders()
    if args.action == "list":
        if args.json:
            listing = {"root": str(cache_root()), "folders": [f.to_dict() for f in folders]}
            print(json.dumps(listing, indent=2))
            return 0
        t = _table(
            f"cnnkit's cache, {cache_root()}",
            "name",
            "holds",
            "folder",
            "size",
            "entries",
            text_columns=3,
        )
        for f in folders:
            t.add_row(f.name, f.what, str(f.path), _size_text(f.size_bytes), f"{f.entries:,}")
        con = _console()
        con.print(t)
        con.print("Clear with: cnnkit cache clear [decoded|datasets] (default: both)", markup=False)
        return 0
    targets = [f for f in folders if (not args.names or f.name in args.names) and f.path.is_dir()]
    if not targets:
        print("nothing to clear")
        return 0
    summary = ", ".join(f"{f.path} ({_size_text(f.size_bytes)})" for f in targets)
    if not args.yes:
        if not sys.stdin.isatty():  # no one to ask: deleting needs an explicit --yes
            raise ValueError(f"this deletes {summary}; add --yes to clear without asking")
        if input(f"delete {summary}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 0
    removed = clear_cache([f.name for f in targets])
    freed = sum(f.size_bytes for f in removed)
    print(f"deleted {', '.join(str(f.path) for f in removed)}: {_size_text(freed)} freed")
    return 0


def _data_config(args):
    """The default settings with the data set of a datasets command (NAME, --data-dir)."""
    from cnnkit.config import Config, apply_overrides

    settings = {"data": args.name, "data_dir": args.data_dir}
    return apply_overrides(Config(), {k: v for k, v in settings.items() if v is not None})


def _preview(args) -> int:
    """datasets preview DATA --augment PRESET: a grid of training images (one per class,
    up to 10), each followed by --views augmented versions, as training draws them."""
    from cnnkit.data.augment import augment_grid
    from cnnkit.data.resolve import load_data

    data = load_data(_data_config(args), None)
    out = Path(args.out or f"augment-{args.augment}.png")
    grid, rows = augment_grid(data, args.augment, views=args.views)
    grid.save(out)
    print(
        f"wrote {out}: {rows} {data.name} training images (one per class), each then "
        f"{args.views} views of '{args.augment}' augmentation"
    )
    return 0


def _input_shape(text: str) -> tuple[int, int, int]:
    """'1x28x28' -> (1, 28, 28), refused in one line otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--input takes CxHxW such as 1x28x28 or 3x224x224, got '{text}'")
    c, h, w = map(int, parts)
    return c, h, w


def _show_model(args, con) -> int:
    """cnnkit models NAME: each layer's output shape and parameters for --input."""
    from cnnkit.models import create_model
    from cnnkit.models.summary import layer_table

    c, h, w = _input_shape(args.input)
    model = create_model(args.name, args.classes, c, (h, w))
    try:
        rows = layer_table(model, (c, h, w))
    except RuntimeError as e:  # e.g. an input too small for the pooling steps
        reason = str(e).strip().splitlines()[0][:160]
        raise ValueError(f"{args.name} does not run on a {args.input} input ({reason})") from None
    t = _table(
        f"{args.name} on a {c}x{h}x{w} input, {args.classes} outputs",
        "layer",
        "type",
        "output shape",
        "parameters",
        text_columns=3,
    )
    for r in rows:
        t.add_row(r.name, r.kind, "x".join(map(str, r.output)), f"{r.params:,}")
    con.print(t)
    total = sum(p.numel() for p in model.parameters())
    con.print(f"{total:,} parameters in all")
    return 0


def cmd_models(args) -> int:
    from cnnkit.models import SPEC_HELP, create_model, list_models

    con = _console()
    if args.spec_help:
        print(SPEC_HELP)
        return 0
    if args.name:
        return _show_model(args, con)
    t = _table(
        "models (parameter counts for 10 classes)",
        "name",
        "description",
        "1x28x28",
        "3x32x32",
        text_columns=2,
    )
    for entry in list_models():
        counts = []
        for c, s in ((1, 28), (3, 32)):
            m = create_model(entry.name, 10, c, (s, s))
            counts.append(f"{sum(p.numel() for p in m.parameters()):,}")
        t.add_row(entry.name, entry.description, *counts)
    con.print(t)
    con.print(
        "Also: any timm architecture (resnet50, efficientnet_lite0, convnext_tiny, ...) or "
        "torchvision one (tv:resnet50, ...), with ImageNet weights via --pretrained; or a "
        "layer spec such as conv32-pool-conv64-pool-drop0.25-fc64 (cnnkit models --spec-help)."
    )
    return 0
