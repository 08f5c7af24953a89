"""bench.py end to end: the sampling benchmark on a trained run, read back from the JSON last line.

Uses the session's `tiny_run` (2 training steps per stage): it checks that the benchmark runs the real
pipeline at the default sampler settings and reports its figures, not what the figures are.
One small batch and one repetition keep it to seconds; the published figures come from `python bench.py`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sampling_benchmark_reports_json(tiny_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench.py", "--only", "sampling", "--run", str(tiny_run),
                           "--sample-batches", "2", "--rounds", "1", "--threads", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(result) == ["machine", "sampling"]  # --only runs just what was asked
    sampling = result["sampling"]
    assert "skipped" not in sampling
    # The benchmark samples as a user would: sample.py's defaults, the paper's 30 steps at guidance 3.0.
    assert sampling["defaults"]["steps"] == 30 and sampling["defaults"]["guidance"] == 3.0
    for kind in ("text_to_image", "text_to_clip"):
        figures = sampling["batch_2"][kind]
        assert len(figures["all_s"]) == 1
        assert figures["images_per_s"] == 2 / figures["s_per_batch"] > 0
    assert "text -> image" in proc.stdout  # the human-readable table is printed too
