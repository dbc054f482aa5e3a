"""train, lr-find and tune, and the --nproc launcher."""

from __future__ import annotations

import json
import os
import sys


def _without_nproc(argv: list[str]) -> list[str]:
    """The train command line with --nproc N (or --nproc=N, or an abbreviation argparse
    took for it, such as --np) taken out: the workers' one."""
    out, skip = [], False
    for arg in argv:
        flag = arg.split("=", 1)[0]
        is_nproc = len(flag) > 3 and "--nproc".startswith(flag)
        if skip:
            skip = False
        elif is_nproc:
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def _launch_workers(args, settings: dict) -> int:
    """``cnnkit train --nproc N``: the same command in N worker processes."""
    from cnnkit.train import distributed

    if distributed.launched():
        raise ValueError(
            "--nproc starts its own worker processes; under torchrun leave it out "
            "(torchrun's --nproc-per-node says how many)"
        )
    # (each worker checks its device: one GPU per process, CUDA or the CPU)
    code, message = distributed.launch(args.nproc, _without_nproc(args.argv))
    if message:
        print(f"{'error: ' if code != 130 else ''}{message}", file=sys.stderr)
    return code


def _lost_contact(error: RuntimeError) -> RuntimeError | None:
    """A clear error for a collective that failed because another worker stopped."""
    from cnnkit.train import distributed

    if not distributed.launched() or not distributed.lost_contact(error):
        return None
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RuntimeError(
        f"lost contact with the other training processes (one stopped, failed or timed "
        f"out; CNNKIT_DIST_TIMEOUT bounds the wait): {first}"
    )


def _settings(args) -> dict:
    """The settings given as flags and --set KEY=VALUE, as dotted keys."""
    settings = {k: v for k, v in vars(args).items() if "." in k}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        settings[key.strip()] = value.strip()
    return settings


def _config(args, settings: dict):
    """The Config of train, lr-find and tune: the defaults, then --config, then the flags."""
    from cnnkit.config import Config, apply_overrides, load_config

    recipe = load_config(args.config) if args.config else {}
    return apply_overrides(apply_overrides(Config(), recipe), settings)


def cmd_train(args) -> int:
    import cnnkit
    from cnnkit.train.loop import TrainingInterrupted

    settings = _settings(args)
    if args.nproc and args.nproc > 1:
        return _launch_workers(args, settings)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if args.resume:
            if args.config:
                raise ValueError("--config cannot be combined with --resume")
            run = cnnkit.resume(args.resume, quiet=args.quiet, **settings)
        else:
            find = str(settings.get("optim.lr", "")).lower() == "find"
            if find:  # the range test picks it (train() records the value in config.yaml)
                settings.pop("optim.lr")
            cfg = _config(args, settings)
            lr = {"lr": "find"} if find else {}
            run = cnnkit.train(cfg, overwrite=args.overwrite, quiet=args.quiet, **lr)
    except RuntimeError as e:
        raise _lost_contact(e) or e from None
    except TrainingInterrupted as e:
        if rank:  # rank 0 says it
            return 130
        run_dir = e.checkpoint.parent
        workers = int(os.environ.get("WORLD_SIZE", "1"))
        on_one_machine = workers == int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        how = f" --nproc {workers}" if workers > 1 and on_one_machine else ""
        print(
            f"\nInterrupted at epoch {e.epoch + 1}, step {e.step}/{e.steps}. "
            f"Saved {e.checkpoint}.\nResume with: cnnkit train --resume {run_dir}{how}",
            file=sys.stderr,
        )
        return 130
    if rank:  # rank 0 reports
        return 0
    if args.quiet:  # scripts still learn where the run is and how it ended
        last, kept = run.history[-1]["val_acc"], run.val_accuracy
        val = "no val"
        if kept is not None:  # best.pt's epoch, which is not always the last
            val = f"best.pt val acc {kept:.4f}" + (
                f" (last epoch {last:.4f})" if last is not None and last != kept else ""
            )
        print(f"{run.path}: {len(run.history)} epochs, {val}")
    if args.resume:  # a new best.pt leaves the old report, evaluations and export behind
        for output in run.stale_outputs():
            print(f"stale  {output.describe()}\n       rebuild: {output.rebuild}")
    return 0


def cmd_lr_find(args) -> int:
    from cnnkit.train.api import lr_find

    result = lr_find(
        _config(args, _settings(args)),
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        steps=args.steps,
        plot=args.out,
        quiet=args.quiet or args.json,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if not args.quiet:
        print(result.describe())
        print(f"plot   {args.out}")
    print(f"suggested lr: {result.suggestion:.3g}")
    return 0


def cmd_tune(args) -> int:
    from cnnkit.tune import run_tune_command

    return run_tune_command(args, _config(args, _settings(args)))
