"""Command-line plumbing shared by the scripts (train.py, sample.py, eval.py, ablation.py): a mistake in
the command line or a run folder (`UserError`, pipeline's `CheckpointError`) is one line on stderr with exit
status 2, never a traceback.
"""
import argparse
import json
import sys

import torch

import blip3o
import pipeline


class UserError(Exception):
    """A mistake in the command line, the inputs or the run folder: one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def positive_int(s: str) -> int:  # an argparse type
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def run_main(fn, *args) -> int:
    """fn(*args) -> 0; a UserError or CheckpointError -> its message on stderr, exit status 2."""
    try:
        fn(*args)
    except (UserError, pipeline.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check_numbers(p: argparse.ArgumentParser, args, at_least_one=(), non_negative=()) -> None:
    """p.error for the first named number out of range (absent and None skipped; nan fails non_negative)."""
    for name in at_least_one:
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in non_negative:
        if not getattr(args, name, 0.0) >= 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def comma_list(p: argparse.ArgumentParser, flag: str, value: str, allowed) -> list[str]:
    """'a,b' -> ["a", "b"], each one of `allowed` (else p.error naming the unknown ones)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        p.error(f"{flag}: unknown {', '.join(unknown) or '(none given)'}; use {', '.join(allowed)}")
    return items


def add_run_options(c: argparse.ArgumentParser, run: bool = True) -> argparse.ArgumentParser:
    """The options of every command that reads a run: --run, --device, --threads."""
    if run:
        c.add_argument("--run", default="out/toy", help="run folder written by train.py")
        c.add_argument("--device", default="auto", help="auto (CUDA -> MPS -> CPU), cpu, cuda, ...")
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 "
                   "is often faster on a CPU that other processes keep busy)")
    return c


def rounded(obj, digits: int = 4):
    """Floats in a nested structure rounded for the JSON line and metrics.json."""
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return round(obj, digits) if isinstance(obj, float) else obj


def metrics_main(run_command, args) -> int:
    """eval.py / ablation.py: run one command; its metrics as ONE JSON object on the last line of stdout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    metrics = {}
    rc = run_main(lambda: metrics.update(run_command(args)))
    if rc == 0:
        print(json.dumps(rounded(metrics)))
    return rc


def add_sampling_options(c) -> None:
    """The generation diffusion's knobs, the paper's by default (the toy pixel decoder has none)."""
    c.add_argument("--steps", type=int, default=blip3o.SAMPLE_STEPS, help="Euler steps, text -> features")
    c.add_argument("--guidance", type=float, default=blip3o.GUIDANCE, help="classifier-free guidance scale")
