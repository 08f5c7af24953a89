"""Command-line plumbing shared by the scripts (train.py, sample.py, eval.py, ablation.py).

A mistake in the command line or in a run folder is reported in one line on stderr with exit status 2,
never a traceback: the scripts raise `UserError` (or blip3o's `CheckpointError`) and `run_main` turns
it into that line.
"""
import argparse
import sys

import blip3o


class UserError(Exception):
    """A mistake in the command line, the inputs or the run folder: one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def positive_int(s: str) -> int:
    """argparse type: a whole number > 0."""
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def run_main(fn, *args) -> int:
    """fn(*args) -> 0; a UserError or CheckpointError -> its message on stderr, exit status 2."""
    try:
        fn(*args)
    except (UserError, blip3o.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
