"""Shared pytest setup: the repository root on sys.path, so tests import `blip3o`, `data`, ... directly."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
