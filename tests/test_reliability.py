"""Failure behaviour, on purpose and tested: user mistakes give one line and exit status 2,
faults (NaN, SIGKILL mid-training or mid-checkpoint, read-only or full disks) never cost more than the
steps since the last checkpoint, and nothing we load can run code.

Real files and real processes: the command-line cases run train.py / sample.py as a user would, and the
kill tests SIGKILL a training process at a chosen moment. (Data faults: corrupt, truncated, odd-mode
and huge images, bad captions, broken tars, and a fuzz of 200+ malformed inputs are in test_shards.py;
an all-bad --data stream is in test_distributed.py.)
"""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip3o
import pipeline
import train
from conftest import in_process

ROOT = Path(__file__).resolve().parent.parent
GENERATE = ["--stage", "generate", "--images", "48", "--batch-size", "4", "--quiet", "--threads", "1"]


def cli(script, *args, env=None):
    """Run a script as a user would: a fresh interpreter, its exit status, stdout and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, res.stderr


def gen_folder(out) -> Path:
    return Path(out) / "generate" / "flow-clip"


def history(out) -> list[dict]:
    return json.loads((pipeline.checkpoint_path(gen_folder(out)) / "meta.json").read_text())["state"]["history"]


# ----------------------------------------------------------------------------------------------------
# User mistakes: one line, exit status 2, before any work is wasted
# ----------------------------------------------------------------------------------------------------

def test_unknown_preset_and_stage():
    """The smoke test of train.py as a user runs it: a fresh interpreter, one line, exit status 2."""
    assert_one_line_error(cli("train.py", "--preset", "blip3o-80b"), "unknown preset 'blip3o-80b'")
    assert_one_line_error(cli("train.py", "--stage", "pretrain"), "invalid choice: 'pretrain'")


ARG_ERRORS = {
    "negative steps": (["--steps", "-3"], "--steps: must be a positive integer, got -3"),
    "zero batch": (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    "nan learning rate": (["--lr", "nan"], "--lr must be > 0"),
    "warmup above 1": (["--warmup", "1.5"], "--warmup must be in [0, 1)"),
    "zero grad clip": (["--grad-clip", "0"], "--grad-clip must be > 0"),
    "unknown flag": (["--learning-rate", "1"], "unrecognized arguments: --learning-rate"),
    "resume and restart": (["--resume", "--restart"], "contradict"),
}


@pytest.mark.parametrize("case", sorted(ARG_ERRORS))
def test_bad_arguments(case, tmp_path, capsys):
    """In-process (the same code as the process above, without an interpreter start-up per case)."""
    args, message = ARG_ERRORS[case]
    with pytest.raises(SystemExit) as exit:
        train.main(["--out", str(tmp_path / "run"), *args])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_world_size(tmp_path):
    """Every rank of `torchrun --nproc_per_node=2` sees this before any process group is formed."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    res = in_process("train.py", "--stage", "generate", "--out", tmp_path / "run", "--global-batch", "5", env=env)
    assert_one_line_error(res, "--global-batch 5 is not divisible by grad-accum x world size (1 x 2)")


def test_missing_checkpoints(tmp_path):
    res = in_process("train.py", *GENERATE, "--out", tmp_path / "empty")
    assert_one_line_error(res, "no checkpoint in", "clip")
    res = in_process("train.py", "--stage", "vae", "--images", "48", "--out", tmp_path / "empty", "--resume")
    assert_one_line_error(res, "--resume: no checkpoint in")


def test_checkpoint_from_another_stage(run):
    """RUN/clip holding the stage-1 checkpoint (a copy gone wrong) is named as such."""
    import shutil

    shutil.rmtree(run / "clip")
    shutil.copytree(run / "understand", run / "clip")
    res = in_process("train.py", *GENERATE, "--out", run, "--steps", "1")
    assert_one_line_error(res, "holds a 'understand' checkpoint, expected 'clip'")


def test_mismatched_checkpoints_name_keys_shapes_and_config(run):
    """A tampered stage-1 checkpoint names its missing key and wrong shape; resuming a stage into a
    different config names the config fields."""
    weights = pipeline.checkpoint_path(run / "understand") / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("projector.linear_1.weight"))
    tensors[name] = tensors[name][:, :-1].contiguous()
    del tensors[next(k for k in tensors if k.endswith("projector.linear_2.bias"))]
    save_file(tensors, weights)
    res = in_process("train.py", *GENERATE, "--out", run, "--steps", "1")
    assert_one_line_error(res, "missing 1 keys, e.g. projector.linear_2.bias",
                          f"{name[len('vlm.'):]}: {tuple(tensors[name].shape)} in")


def test_resume_into_another_config_names_the_fields(run):
    assert train.main([*GENERATE, "--out", str(run), "--steps", "1"]) == 0
    meta_file = gen_folder(run) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["dit"]["num_layers"] += 1
    meta_file.write_text(json.dumps(meta))
    res = in_process("train.py", *GENERATE, "--out", run, "--steps", "2")  # more steps: a resume
    layers = meta["config"]["dit"]["num_layers"]
    assert_one_line_error(res, f"dit.num_layers {layers} in the checkpoint, {layers - 1} now", "--restart")


def test_resume_with_mis_shaped_weights_names_them(run):
    assert train.main([*GENERATE, "--out", str(run), "--steps", "1"]) == 0
    weights = gen_folder(run) / "model.safetensors"
    tensors = load_file(weights)
    width = tensors["generator.queries"].shape[1]
    tensors["generator.queries"] = tensors["generator.queries"][:32].contiguous()
    save_file(tensors, weights)
    res = in_process("train.py", *GENERATE, "--out", run, "--steps", "2")
    assert_one_line_error(res, f"generator.queries is (32, {width}) in the checkpoint, (64, {width}) in the model")


def test_sample_unreadable_image(tiny_run, tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # a PNG signature, then garbage
    res = in_process("sample.py", "--run", tiny_run, "--image", bad, "--question", "what color is the circle ?")
    assert_one_line_error(res, f"cannot decode image {bad}")


def test_sample_over_long_prompt_is_refused(tiny_run, tmp_path):
    """Longer than the backbone's context (the toy: 160 positions minus the 64 queries = 96 tokens):
    refused with the numbers, nothing written. (Not truncated: the image would silently miss part of
    what was asked for.)"""
    long_prompt = "a photo of " + " ".join(["a red circle and"] * 30) + " a blue square"
    res = in_process("sample.py", "--run", tiny_run, "--prompt", long_prompt, "--steps", "1",
              "--num-samples", "1", "--out", tmp_path / "s.png")
    assert_one_line_error(res, "is longer than the backbone allows (96 beside the queries)")
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("args, message", [(["--prompt", " "], "empty prompt"),
                                           (["--prompt", "a red circle", "--guidance", "-0.5"], "--guidance must be >= 0"),
                                           (["--prompt", "a red circle", "--steps", "-1"], "--steps must be")])
def test_sample_bad_numbers_and_empty_prompt(args, message, tiny_run, capsys):
    import sample

    with pytest.raises(SystemExit) as exit:
        sample.main(["--run", str(tiny_run), *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


# ----------------------------------------------------------------------------------------------------
# A damaged run folder: every script names the file, what is wrong and what to do (exit status 2)
# ----------------------------------------------------------------------------------------------------


def one_line_error(capsys, rc, *fragments):
    """In-process twin of assert_one_line_error: main() returned 2 and wrote one line on stderr."""
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (rc, err)
    for fragment in fragments:
        assert fragment in err, err


def copy_run(tiny_run, tmp_path) -> Path:
    import shutil

    shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("*.prev"))
    return tmp_path / "run"


def scripts_reading(run, image):
    """The three ways a run is read: sample.py (answer), eval.py (understanding), train.py (stage 2)."""
    import eval as evaluation
    import sample

    return {"sample": lambda: sample.main(["--run", str(run), "--image", str(image), "--question",
                                           "what color is the circle ?"]),
            "eval": lambda: evaluation.main(["understand", "--run", str(run), "--n", "4"]),
            # tiny_run's stage 2 is finished at 2 steps: a third makes train.py read stage 1 again
            "train": lambda: train.main([*GENERATE, "--out", str(run), "--steps", "3"])}


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (32, 32), "red").save(path)
    return path


DAMAGE = {
    "truncated weights": ("understand/model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:100]),
                          "is damaged (Error while deserializing header: invalid header length)"),
    "invalid meta.json": ("understand/meta.json", lambda f: f.write_text('{"stage": "underst'),
                          "is damaged (Unterminated string"),
    "meta.json without a stage": ("understand/meta.json", lambda f: f.write_text("[1, 2]"),
                                  "is not a checkpoint's meta.json"),
    "missing weights": ("understand/model.safetensors", lambda f: f.unlink(), "is missing"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_named_by_every_script(case, tiny_run, tmp_path, image, capsys):
    run = copy_run(tiny_run, tmp_path)
    name, damage, what = DAMAGE[case]
    damage(run / name)
    for script, call in scripts_reading(run, image).items():
        one_line_error(capsys, call(), f"{run / name} {what}",
                       f"python train.py --stage understand --restart --out {run}")


def test_missing_tokenizer_folder(tiny_run, tmp_path, image, capsys):
    import shutil

    run = copy_run(tiny_run, tmp_path)
    shutil.rmtree(run / "clip" / "tokenizer")
    for script, call in scripts_reading(run, image).items():
        one_line_error(capsys, call(), f"{run / 'clip' / 'tokenizer'} is missing",
                       f"python train.py --stage clip --restart --out {run}")


def test_checkpoint_of_another_stage_or_config(tiny_run, tmp_path, image, capsys):
    """RUN/decoder holding the VAE (another stage); RUN/understand from a run with a narrower LM."""
    import shutil

    run = copy_run(tiny_run, tmp_path)
    shutil.rmtree(run / "decoder")
    shutil.copytree(run / "vae", run / "decoder")
    for script, call in scripts_reading(run, image).items():
        if script != "train":  # stage 2 does not read the decoder
            one_line_error(capsys, call(), "holds a 'vae' checkpoint, expected 'decoder'",
                           f"--stage decoder --restart --out {run}")
    shutil.rmtree(run / "decoder")
    weights = run / "understand" / "model.safetensors"
    tensors = load_file(weights)
    key = "vlm.projector.linear_1.weight"
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, weights)
    for script, call in scripts_reading(run, image).items():
        one_line_error(capsys, call(), "shape mismatch", "--stage understand")


def test_run_of_an_older_decoder_design(tiny_run, tmp_path, image, capsys):
    """A run saved by an older PixelDecoder (other config fields, other weights): its other stages stay
    usable, and reading its decoder names the keys that differ and the command that retrains it."""
    run = copy_run(tiny_run, tmp_path)
    for meta_file in run.glob("*/meta.json"):
        meta = json.loads(meta_file.read_text())
        if meta["config"].get("decoder"):
            meta["config"]["decoder"].update(layers=3, octaves=5)
            meta_file.write_text(json.dumps(meta))
    weights = run / "decoder" / "model.safetensors"
    save_file({k.replace("sprites", "render.0.weight"): v for k, v in load_file(weights).items()}, weights)
    for script, call in scripts_reading(run, image).items():
        if script == "train":  # stage 2 reads CLIP and stage 1, whose configs name the old decoder fields
            assert call() == 0
        else:
            one_line_error(capsys, call(), "does not match the 'decoder' model", "unexpected",
                           f"--stage decoder --restart --out {run}")


def test_run_folder_that_is_a_file(tmp_path, image, capsys):
    run = tmp_path / "run"
    run.write_text("not a folder")
    for script, call in scripts_reading(run, image).items():
        one_line_error(capsys, call(), f"{run} is a file, not a run folder")


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(run, capsys):
    """train.py keeps the previous checkpoint; a truncated latest one is named, and training resumes
    from the previous one (which stays until an intact newer one replaces the damaged one)."""
    args = [*GENERATE, "--out", str(run), "--ckpt-every", "1"]
    assert train.main([*args, "--steps", "2"]) == 0
    prev = pipeline.previous_path(gen_folder(run))
    assert pipeline.load_checkpoint(gen_folder(run), path=prev)[0]["state"]["step"] == 1
    weights = gen_folder(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    assert train.main([*args, "--steps", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"warning: {weights} is damaged (Error while deserializing header: invalid header "
                            f"length): resuming from the previous checkpoint {prev} (step 1)\n")
    assert f"resuming at step 1 from {prev}" in captured.out
    assert [h["step"] for h in history(run)] == [1, 2, 3]
    assert pipeline.load_checkpoint(gen_folder(run), path=prev)[0]["state"]["step"] == 2


def test_damaged_latest_checkpoint_without_a_previous_one(run, capsys):
    assert train.main([*GENERATE, "--out", str(run), "--steps", "1"]) == 0
    (gen_folder(run) / "meta.json").write_text("{")
    rc = train.main([*GENERATE, "--out", str(run), "--steps", "2"])
    one_line_error(capsys, rc, f"{gen_folder(run) / 'meta.json'} is damaged",
                   f"python train.py --stage generate --loss flow --target clip --restart --out {run}")


def test_damaged_run_is_one_line_from_a_real_process(tiny_run, tmp_path):
    """The same as above through the interpreter a user starts: exit status 2, no traceback."""
    run = copy_run(tiny_run, tmp_path)
    weights = run / "generate" / "flow-clip" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    res = cli("sample.py", "--run", run, "--prompt", "a photo of a red circle")
    assert_one_line_error(res, f"{weights} is damaged", "--stage generate --loss flow --target clip --restart")


# ----------------------------------------------------------------------------------------------------
# Words the toy never saw: refused by name unless --allow-unknown-words
# ----------------------------------------------------------------------------------------------------


def test_unknown_words_are_refused_by_name(tiny_run, tmp_path, image, capsys):
    import ablation
    import sample

    out = tmp_path / "s.png"
    prompt = ["--run", str(tiny_run), "--prompt", "a photo of a purple dragon riding a bike", "--steps", "1",
              "--num-samples", "1", "--out", str(out)]
    one_line_error(capsys, sample.main(prompt), "does not know the words 'dragon', 'riding', 'bike'",
                   f"knows {len(__import__('data').VOCAB)} words", "--allow-unknown-words")
    assert not out.exists()
    question = ["--run", str(tiny_run), "--image", str(image), "--question", "what colour is the circle ?"]
    one_line_error(capsys, sample.main(question), "does not know the word 'colour'")
    one_line_error(capsys, ablation.main(["diversity", "--run", str(tiny_run), "--prompts", "a red dragon"]),
                   "'dragon'")
    assert sample.main([*prompt, "--allow-unknown-words"]) == 0 and out.is_file()
    assert sample.main([*question, "--allow-unknown-words"]) == 0


def test_questions_and_prompts_as_people_type_them(tiny_run, image, capsys):
    import data
    import sample

    toy = blip3o.build_toy_tokenizer(data.VOCAB)
    typed = ["What color is the shape?", "A photo of a red Circle.", "where is the circle relative to the square?"]
    spaced = ["what color is the shape ?", "a photo of a red circle .", "where is the circle relative to the square ?"]
    assert blip3o.unknown_words(toy, typed) == []
    assert torch.equal(blip3o.encode_texts(toy, typed, 16)[0], blip3o.encode_texts(toy, spaced, 16)[0])
    assert blip3o.unknown_words(toy, ["What's the shape?", "Circle."]) == ["what's"]
    question = ["--run", str(tiny_run), "--image", str(image), "--question"]
    assert sample.main([*question, "what color is the shape?"]) == 0
    one_line_error(capsys, sample.main([*question, "What's the shape?"]), "does not know the word \"what's\"")


def test_a_bpe_tokenizer_knows_every_word():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import data

    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    assert blip3o.unknown_words(PreTrainedTokenizerFast(tokenizer_object=bpe), ["a purple dragon"]) == []
    toy = blip3o.build_toy_tokenizer(data.VOCAB)
    assert blip3o.unknown_words(toy, ["a purple dragon", "a dragon and a bike"]) == ["dragon", "bike"]


# ----------------------------------------------------------------------------------------------------
# The run folder cannot be written: a clear error before any training
# ----------------------------------------------------------------------------------------------------


def test_read_only_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a place even root cannot write
            locked = Path("/sys/blip3o-read-only-test")
        res = cli("train.py", "--stage", "vae", "--out", locked / "run")
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert_one_line_error(res, f"cannot write to {locked / 'run'}")
    assert "parameters" not in res.stdout  # refused before building anything


def test_full_disk(tmp_path, monkeypatch, capsys):
    """The 1 MiB probe written and fsync'd at start-up meets ENOSPC: stop before training."""
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    assert train.main(["--stage", "vae", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: cannot write to {tmp_path / 'run'}: No space left on device\n"
    assert "parameters" not in captured.out
    assert not list((tmp_path / "run").iterdir())  # the probe is gone too


# ----------------------------------------------------------------------------------------------------
# NaN / inf: stop, name the step and the last good checkpoint, never save a NaN
# ----------------------------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run, monkeypatch, capsys):
    real_loss = blip3o.flow_matching_loss
    calls = []

    def poisoned(*a, **k):  # steps 1-2 fine, NaN from step 3 on
        calls.append(1)
        value, t, per = real_loss(*a, **k)
        return (value * float("nan"), t, per) if len(calls) > 2 else (value, t, per)

    monkeypatch.setattr(blip3o, "flow_matching_loss", poisoned)
    rc = train.main([*GENERATE, "--out", str(run), "--steps", "5", "--ckpt-every", "2"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err == (f"error: [generate/flow-clip] loss is nan at step 3; last good checkpoint: "
                   f"{gen_folder(run)} (not overwritten)\n")
    meta, tensors, _ = pipeline.load_checkpoint(gen_folder(run))
    assert meta["state"]["step"] == 2 and not meta["state"]["done"]
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_a_nan_tensor_is_never_written(tmp_path):
    folder = tmp_path / "ckpt"
    pipeline.save_checkpoint(folder, {"w": torch.ones(3)}, {"stage": "x", "state": {}})
    with pytest.raises(pipeline.CheckpointError, match="non-finite tensor: w"):
        pipeline.save_checkpoint(folder, {"w": torch.tensor([1.0, float("inf"), 2.0])}, {"stage": "x"})
    _, tensors, _ = pipeline.load_checkpoint(folder)
    assert torch.equal(tensors["w"], torch.ones(3))  # the previous checkpoint, through safetensors


# ----------------------------------------------------------------------------------------------------
# SIGKILL: during training, and in the middle of writing a checkpoint
# ----------------------------------------------------------------------------------------------------

# The training process is real; this driver only adds a pause at the moment the test wants to kill it
# (and prints a marker), then runs train.main exactly as `python train.py` does.
DRIVER = """
import pathlib, sys, time
sys.path.insert(0, {root!r})
import pipeline, safetensors.torch, train

def pause(marker):
    print(marker, flush=True)
    time.sleep(600)

moment, step = sys.argv[1], int(sys.argv[2])
if moment == "after-save":  # training goes on after the step-N checkpoint: killed mid-training
    real_save = pipeline.save_checkpoint
    def save(folder, tensors, meta, *a, **k):
        real_save(folder, tensors, meta, *a, **k)
        if meta["state"]["step"] == step:
            pause("KILL-ME")
    pipeline.save_checkpoint = save
elif moment == "mid-write":  # the new checkpoint's weights are half written into the temporary folder
    real_file = safetensors.torch.save_file
    def save_file(tensors, path, *a, **k):
        real_file(tensors, path, *a, **k)
        if pipeline.checkpoint_path(pathlib.Path(path).parent.parent / "flow-clip") is not None:
            pause("KILL-ME")
    safetensors.torch.save_file = save_file
elif moment == "mid-rename":  # the old checkpoint renamed aside, the new one not yet in place
    real_rename = pathlib.Path.rename
    def rename(self, target):
        out = real_rename(self, target)
        if str(target).endswith(".prev"):
            pause("KILL-ME")
        return out
    pathlib.Path.rename = rename
sys.exit(train.main(sys.argv[3:]))
"""


def kill_at(tmp_path, moment: str, step: int, args) -> None:
    """Start training in a fresh process, wait for the chosen moment, SIGKILL it."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(driver), moment, str(step), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    watchdog = threading.Timer(240, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("KILL-ME"):
                os.kill(proc.pid, signal.SIGKILL)
                break
        assert proc.wait() == -signal.SIGKILL, "".join(lines)
    finally:
        watchdog.cancel()
        proc.stdout.close()


def test_sigkill_during_training_then_resume_continues_the_same_curve(run, tmp_path):
    """Killed after the step-2 checkpoint (somewhere in step 3): the resumed run's steps 3-4 are the
    uninterrupted run's steps 3-4 (same seed: the data and noise of a step are fixed by its number)."""
    import shutil

    whole = tmp_path / "whole"
    shutil.copytree(run, whole)
    args = [*GENERATE, "--steps", "4", "--ckpt-every", "2"]
    assert train.main([*args, "--out", str(whole)]) == 0
    kill_at(tmp_path, "after-save", 2, [*args, "--out", run])
    assert json.loads((gen_folder(run) / "meta.json").read_text())["state"]["step"] == 2
    assert train.main([*args, "--out", str(run), "--resume"]) == 0
    resumed, reference = history(run), history(whole)
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    assert [(h["loss"], h["grad_norm"]) for h in resumed] == [(h["loss"], h["grad_norm"]) for h in reference]


@pytest.mark.parametrize("moment", ["mid-write", "mid-rename"])
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(moment, run, tmp_path):
    """Killed while the step-2 checkpoint is written: the step-1 checkpoint still loads (from its own
    folder, or from `<folder>.prev` if the kill fell between the two renames), and a resume finishes."""
    args = [*GENERATE, "--steps", "3", "--ckpt-every", "1"]
    kill_at(tmp_path, moment, 2, [*args, "--out", run])
    siblings = sorted(p.name for p in gen_folder(run).parent.iterdir())
    if moment == "mid-rename":
        assert siblings[0] == "flow-clip.prev" and "flow-clip" not in siblings
    else:
        assert siblings[0] == "flow-clip" and re.fullmatch(r"flow-clip\.tmp-\d+", siblings[1])
    meta, tensors, opt = pipeline.load_checkpoint(gen_folder(run), stage="generate/flow-clip", with_optimizer=True)
    assert meta["state"]["step"] == 1 and opt is not None and "generator.queries" in tensors
    assert train.main([*args, "--out", str(run)]) == 0
    # debris cleared; the step-2 checkpoint kept as the previous one
    assert sorted(p.name for p in gen_folder(run).parent.iterdir()) == ["flow-clip", "flow-clip.prev"]
    assert pipeline.load_checkpoint(gen_folder(run), path=pipeline.previous_path(gen_folder(run)))[0]["state"]["step"] == 2
    assert [h["step"] for h in history(run)] == [1, 2, 3]


# ----------------------------------------------------------------------------------------------------
# Only safe loading: nothing read from disk can execute code
# ----------------------------------------------------------------------------------------------------


def test_only_safe_loading_in_the_code():
    """Weights are safetensors; the one pickle (optimizer state) is read with weights_only=True; no
    pickle / np.load(allow_pickle) / trust_remote_code anywhere (Qwen2.5-VL is built into transformers)."""
    sources = {p.name: p.read_text() for p in ROOT.glob("*.py")}
    assert {"blip3o.py", "train.py", "sample.py", "eval.py", "data.py"} <= set(sources)
    for name, text in sources.items():
        for call in re.findall(r"torch\.load\((.*)", text):
            assert "weights_only=True" in call, f"{name}: torch.load({call}"
        assert not re.search(r"\bpickle\.loads?\(|allow_pickle\s*=\s*True|trust_remote_code\s*=", text), name


def test_optimizer_state_cannot_smuggle_code(tmp_path):
    """A checkpoint whose optimizer.pt holds an arbitrary object is refused by the loader, not run."""
    folder, witness = tmp_path / "ckpt", tmp_path / "pwned"
    pipeline.save_checkpoint(folder, {"w": torch.ones(2)}, {"stage": "x", "state": {}}, {"state": {}})
    torch.save({"state": {}, "evil": Exploit(witness)}, folder / "optimizer.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        pipeline.load_checkpoint(folder, with_optimizer=True)
    assert not witness.exists()


class Exploit:
    """Unpickling this runs a shell command: what a hostile optimizer.pt could carry."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        return (os.system, (f"touch {self.witness}",))


def test_one_seed_one_model_through_every_entry_point(tmp_path, one_thread):
    """`train.py` (every stage, then the report) and the stages trained one command at a time give the
    same weights, bit for bit: each stage's initial weights come from (seed, stage) alone, not from what
    an earlier stage drew before it in the same process. Same process, same thread count: identical."""
    from safetensors.torch import load_file

    from conftest import TINY

    whole, apart = tmp_path / "whole", tmp_path / "apart"
    assert train.main(["--out", str(whole), "--no-eval", *TINY]) == 0
    for stage in train.PIPELINE:
        assert train.main(["--stage", stage, "--out", str(apart), *TINY]) == 0
    for stage in ("clip", "understand", "decoder", "generate/flow-clip"):
        a, b = load_file(whole / stage / "model.safetensors"), load_file(apart / stage / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
