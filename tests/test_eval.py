"""eval.py: each command's metrics are the last stdout line as JSON, errors are one line with exit 2,
the GenEval writer + scorer agree with ground truth, and full_report writes its files and caches.

The models come from the session's `tiny_run` (2 training steps per stage), so the numbers are those of
an untrained model: these tests check the plumbing and the scoring logic, with tiny evaluation sizes.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import data
import eval as evaluation
import sample
from conftest import in_process, run_script

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args):
    """eval.py's main() in this process: exit status, stdout, stderr (the smoke test below runs the script)."""
    return in_process("eval.py", *args)


def test_eval_script_smoke():
    """eval.py as a user runs it (a fresh interpreter): a missing command is one line, exit status 2."""
    res = run_script("eval.py")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1


def last_json(stdout: str) -> dict:
    lines = stdout.rstrip("\n").split("\n")
    assert len(lines) > 1, "a table is printed above the JSON line"
    return json.loads(lines[-1])


# --- scoring logic, no model ------------------------------------------------------------------------


def test_meaning_ignores_word_order():
    by_prompt = {r["prompt"]: r for split in ("train", "test") for r in data.geneval_prompts(split, None)}
    same = [("a photo of a circle and a square", "a photo of a square and a circle"),
            ("a photo of a circle left of a square", "a photo of a square right of a circle"),
            ("a photo of a triangle above a circle", "a photo of a circle below a triangle")]
    for a, b in same:
        assert evaluation.meaning(by_prompt[a]) == evaluation.meaning(by_prompt[b])
    a, b = "a photo of a circle left of a square", "a photo of a circle right of a square"
    assert evaluation.meaning(by_prompt[a]) != evaluation.meaning(by_prompt[b])
    for tag in data.TAGS:  # within a tag, prompts that mean the same come at most in pairs
        keys = [evaluation.meaning(r) for r in evaluation.tag_records(tag)]
        assert all(keys.count(k) <= 2 for k in keys)


def test_ground_truth_folder_scores_high_and_writes_results(tmp_path):
    """sample.py's writer + eval.py's scorer on renders that satisfy each record: near-perfect."""
    records = data.geneval_prompts("test", n_per_tag=4)
    images = torch.stack([torch.stack([data.to_tensor(data.render(r, seed=s)) for s in range(2)])
                          for r in records])  # (P, 2, 3, 32, 32)
    assert sample.write_geneval(tmp_path, records, images) == 2 * len(records)
    m = evaluation.eval_geneval(tmp_path)
    assert m["overall"] >= 0.98 and set(m["per_tag"]) == set(data.TAGS)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == m["images"] == 2 * len(records)
    assert set(json.loads(lines[0])) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}


def test_recon_scores_of_perfect_reconstructions():
    """Originals passed as their own reconstructions score 1.0: the tensor -> pixels path is right."""
    images, scenes = data.make_image_set(12, split="test", seed=9)
    m = evaluation.recon_scores(images, images.float() / 255, scenes)
    assert m["recon"] == 1.0 and m["originals"] == 1.0 and m["images"] == 12


def test_question_set_one_of_each_type_per_scene():
    images, rows, n_objects = evaluation.question_set(60, seed=4)
    assert len(rows) == 60 and images.dtype == torch.uint8 and len(n_objects) == len(images)
    assert set(n_objects) <= {1, 2, 3, 4} and {1, 2} <= set(n_objects)
    per_image = {}
    for i, qtype, question, answer in rows:
        per_image.setdefault(i, []).append(qtype)
        assert " " not in answer  # one-word answers
    assert all(len(q) == len(set(q)) for q in per_image.values())
    assert {q for qs in per_image.values() for q in qs} == set(data.QTYPES)


# --- every command through the CLI's main() --------------------------------------------------------------


@pytest.mark.parametrize("command", ["clip", "understand", "recon", "toygeneval"])
def test_command_prints_json_last(command, tiny_run):
    args = {
        "clip": ["--n", "20"],
        "understand": ["--n", "12", "--captions", "4"],
        "recon": ["--n", "6"],
        "toygeneval": ["--per-tag", "1", "--per-prompt", "1", "--steps", "2", "--per-seen", "2"],
    }[command]
    res = run_cli(command, "--run", tiny_run, *args)
    assert res.returncode == 0, res.stderr
    m = last_json(res.stdout)
    key = {"clip": "zero_shot", "understand": "per_type", "recon": "recon", "toygeneval": "overall"}[command]
    assert key in m
    if command == "understand":
        assert set(m["per_type"]) == set(data.QTYPES) and "caption_exact" in m
        for qtype, sizes in m["by_scene_size"].items():  # a split of the same questions, nothing lost
            assert sum(v["questions"] for v in sizes.values()) == m["per_type"][qtype]["questions"]
            hits = sum(v["accuracy"] * v["questions"] for v in sizes.values())
            # Whole numbers of hits, from accuracies the JSON rounds to 4 digits (each product off by
            # < 0.5 below 10,000 questions): the two counts round to the same integer.
            assert round(hits) == round(m["per_type"][qtype]["accuracy"] * m["per_type"][qtype]["questions"])
    if command == "toygeneval":  # the folder it wrote is in GenEval's layout, and `geneval` rescores it
        assert set(m["per_tag"]) == set(data.TAGS)
        # GenEval's own sense beside the held-out tags: seen arrangements (all 18) and seen colour pairs.
        for tag, prompts in (("position", 18), ("color_attr", 15)):
            seen = m[f"{tag}_seen"]
            assert (seen["prompts"], seen["images"]) == (prompts, 2 * prompts) and 0 <= seen["decoded"] <= 1
        folder = Path(tiny_run) / "geneval-flow-clip"
        assert len(list(folder.glob("0*/samples/0000.png"))) == len(data.TAGS)
        res = run_cli("geneval", folder)
        assert res.returncode == 0, res.stderr
        assert last_json(res.stdout)["overall"] == m["overall"]


def test_toygeneval_tags_selects_prompts(tiny_run, tmp_path):
    """--tags keeps only those tags' held-out prompts; a --per-tag above a tag's size takes all of them."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("geneval-*", "REPORT.md", "metrics.json"))
    res = run_cli("toygeneval", "--run", run, "--tags", "single_object,colors", "--per-tag", "100",
                  "--per-prompt", "1", "--steps", "2")
    assert res.returncode == 0, res.stderr
    m = last_json(res.stdout)
    assert set(m["per_tag"]) == {"single_object", "colors"}
    expected = [r for r in data.geneval_prompts("test", n_per_tag=None)
                if r["tag"] in ("single_object", "colors")]
    assert m["images"] == len(expected)


@pytest.mark.parametrize("case", ["missing checkpoint", "missing run", "bad flag", "bad number",
                                  "negative guidance", "unknown tag", "geneval missing dir", "no command"])
def test_cli_errors_are_one_line(case, tiny_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "missing checkpoint": ["understand", "--run", empty],
        "missing run": ["clip", "--run", tmp_path / "nope"],
        "bad flag": ["clip", "--run", tiny_run, "--no-such-flag"],
        "bad number": ["clip", "--run", tiny_run, "--n", "0"],
        "negative guidance": ["toygeneval", "--run", tiny_run, "--guidance", "-2"],
        "unknown tag": ["toygeneval", "--run", tiny_run, "--tags", "single_object,bench"],
        "geneval missing dir": ["geneval", tmp_path / "nope"],
        "no command": [],
    }[case]
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout


# --- the report ----------------------------------------------------------------------------------


def test_full_report_writes_files_and_caches(tiny_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("geneval-*", "REPORT.md", "metrics.json"))
    small = dict(clip_images=20, questions=12, captions=4, recon_images=8, geneval_per_tag=1, per_prompt=2,
                 views_per_tag=1, views_samples=1, steps=2)
    for k, v in small.items():
        monkeypatch.setitem(evaluation.REPORT, k, v)
    monkeypatch.setattr(evaluation, "SWEEP_STEPS", (1, 2))

    first = evaluation.full_report(run, timings={"clip": 12.5, "understand": 30.0, "generate": 20.0},
                                   train_seconds=70.0, device="cpu")
    assert not first["cached"]
    for name in ("REPORT.md", "metrics.json", "samples.png", "reconstructions.png", "loss_clip.png",
                 "loss_understand.png", "loss_decoder.png", "loss_generate-flow-clip.png", "trajectory.png",
                 "trajectory.gif", "words.png", "sweep.png", "sweep_plot.png"):
        assert (run / name).is_file(), name
    m = first["metrics"]
    assert {"clip", "understand", "recon", "toygeneval", "views"} <= set(m)
    report = (run / "REPORT.md").read_text()
    for section in ("Toy GenEval", "Inside the sampler", "Understanding", "CLIP", "Reconstruction", "Timings",
                    "Commands"):
        assert section in report
    for picture in ("trajectory.png", "words.png", "sweep.png", "sweep_plot.png"):
        assert f"]({picture})" in report  # embedded
    assert "peaks inside that shape's box for" in report
    assert "held-out metric" in capsys.readouterr().out  # the compact summary table

    def no_evaluation(*a, **k):
        raise AssertionError("a cached report evaluates nothing")

    evaluate_all = evaluation.evaluate_all
    monkeypatch.setattr(evaluation, "evaluate_all", no_evaluation)
    second = evaluation.full_report(run, timings={"clip": 0.0, "understand": 0.0}, train_seconds=3.0,
                                    device="cpu")
    monkeypatch.setattr(evaluation, "evaluate_all", evaluate_all)
    assert second["cached"]
    assert second["metrics"] == json.loads(json.dumps(m))  # the same numbers
    assert second["train_seconds_per_stage"] == {"clip": 12.5, "understand": 30.0, "generate/flow-clip": 20.0}
    assert second["last_train_run_seconds"] == 70.0  # nothing was trained the second time
    assert json.loads((run / "metrics.json").read_text())["metrics"] == second["metrics"]

    # Any checkpoint that changes (a resumed or retrained stage) invalidates the cache.
    meta = run / "decoder" / "meta.json"
    os.utime(meta, ns=(meta.stat().st_atime_ns, meta.stat().st_mtime_ns + 10 ** 9))
    assert evaluation.fingerprint(run) != second["fingerprint"]
