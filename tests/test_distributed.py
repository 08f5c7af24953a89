"""train.py at scale, on the CPU: torchrun (DDP over gloo), FSDP2, gradient checkpointing, the global
batch, and streamed WebDataset shards with a resumable position.

Every run is the toy generation stage with tiny sizes on top of the session's `tiny_run` (CLIP and the
stage-1 LM); each test trains into a fresh copy of those two checkpoints. The torchrun runs start real
processes and are marked slow.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blip3o
import data
from conftest import write_shards
import pipeline
import train

ROOT = Path(__file__).resolve().parent.parent
GENERATE = ["--stage", "generate", "--images", "48", "--quiet", "--threads", "1"]


def history(out, variant="flow-clip") -> list[dict]:
    meta = json.loads((pipeline.checkpoint_path(Path(out) / "generate" / variant) / "meta.json").read_text())
    return meta["state"]["history"]


def assert_same_curve(a: list[dict], b: list[dict]):
    """Per-step loss and gradient norm equal up to the rounding of the log (5 and 4 decimals).

    The two runs split the same global batch differently (ranks, accumulation, FSDP shards), so their
    fp32 sums reassociate: the tolerances are twice the log's last digit, not bit equality."""
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=2e-5), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], abs=2e-4), (x, y)


def torchrun(*args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


class Interrupt(Exception):
    """Stands in for a crash right after a checkpoint (the SIGKILL version is in test_reliability)."""


def crash_after_checkpoint(monkeypatch, at_step: int):
    real_save = pipeline.save_checkpoint

    def save(folder, tensors, meta, *a, **k):
        real_save(folder, tensors, meta, *a, **k)
        if meta["state"]["step"] == at_step and not meta["state"]["done"]:
            raise Interrupt

    monkeypatch.setattr(pipeline, "save_checkpoint", save)


# ----------------------------------------------------------------------------------------------------
# Several processes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_ddp_and_fsdp_match_one_process(run, tmp_path):
    """Two gloo ranks x micro-batch 4 (DDP, then FSDP2) == one process x 2 accumulated micro-batches of 4:
    the same chunks of data and noise, so the same losses and gradient norms, step by step."""
    common = [*GENERATE, "--steps", "3", "--batch-size", "4", "--ckpt-every", "2"]
    single, ddp, fsdp = (tmp_path / name for name in ("single", "ddp", "fsdp"))
    for out in (single, ddp, fsdp):
        shutil.copytree(run, out)
    assert train.main([*common, "--grad-accum", "2", "--out", str(single)]) == 0
    proc = torchrun(*common, "--out", ddp)
    assert "global batch 8 = 4 micro x 1 accum x 2 ranks" in proc.stdout
    torchrun(*common, "--out", fsdp, "--fsdp")
    assert_same_curve(history(ddp), history(single))
    assert_same_curve(history(fsdp), history(single))
    # The FSDP checkpoint holds whole tensors (gathered from the shards), loadable by sample.py.
    _, tensors, _ = pipeline.load_checkpoint(fsdp / "generate" / "flow-clip", stage="generate/flow-clip")
    _, ref, _ = pipeline.load_checkpoint(single / "generate" / "flow-clip", stage="generate/flow-clip")
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.slow
def test_torchrun_streams_shards_split_over_ranks(run, tmp_path):
    """--data under torchrun: each rank reads its own shards; positions and skip counts of both ranks
    are in the checkpoint, and the log sums them."""
    shards = write_toy_shards(tmp_path / "shards", n=40, per_shard=10)
    proc = torchrun(*GENERATE, "--steps", "2", "--batch-size", "4", "--out", run, "--data",
                    str(Path(shards[0]).parent / "shard-{00000..00003}.tar"))
    state = json.loads((run / "generate" / "flow-clip" / "meta.json").read_text())["state"]["data"]
    assert state["world"] == 2 and [r["ok"] for r in state["ranks"]] == [8, 8]
    assert "16 samples read, 4 skipped (bad_image 2, missing_caption 2)" in proc.stdout


def test_fsdp_in_one_process_matches_ddp_path_and_resumes(run, tmp_path, monkeypatch):
    """--fsdp under plain python (a process group of one): the same numbers as without it; a crash after
    the step-2 checkpoint and a resume (sharded optimizer + EMA restored) continue the same curve."""
    plain, fsdp = tmp_path / "plain", tmp_path / "fsdp"
    shutil.copytree(run, plain)
    shutil.copytree(run, fsdp)
    args = [*GENERATE, "--steps", "4", "--batch-size", "4", "--ckpt-every", "2"]
    assert train.main([*args, "--out", str(plain)]) == 0
    crash_after_checkpoint(monkeypatch, at_step=2)
    with pytest.raises(Interrupt):
        train.main([*args, "--out", str(fsdp), "--fsdp"])
    monkeypatch.undo()
    assert train.main([*args, "--out", str(fsdp), "--fsdp"]) == 0
    assert_same_curve(history(fsdp), history(plain))
    _, a, _ = pipeline.load_checkpoint(plain / "generate" / "flow-clip")
    _, b, _ = pipeline.load_checkpoint(fsdp / "generate" / "flow-clip")
    for k in a:  # weights and EMA after the resumed run: FSDP reduces gradients in another order (fp32),
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # and Adam carries that for 4 steps


def test_fsdp_is_refused_where_not_supported(run, capsys):
    assert train.main(["--stage", "vae", "--out", str(run), "--fsdp", "--quiet"]) == 2
    assert "--fsdp is for --stage generate" in capsys.readouterr().err


def test_global_batch_must_divide_by_accum_and_world(run, monkeypatch, capsys):
    """Checked on every rank before any process group exists, so no rank waits for another."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert train.main([*GENERATE, "--out", str(run), "--global-batch", "16", "--grad-accum", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --global-batch 16 is not divisible by grad-accum x world size (2 x 3)"
    assert not torch.distributed.is_initialized()


def test_global_batch_sets_the_micro_batch(run, capsys):
    assert train.main([*GENERATE, "--out", str(run), "--steps", "1", "--global-batch", "8",
                       "--grad-accum", "2"]) == 0
    assert "global batch 8 = 4 micro x 2 accum x 1 ranks" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Gradient checkpointing of the backbone
# ----------------------------------------------------------------------------------------------------


def test_grad_checkpointing_recomputes_the_backbone_and_changes_nothing(tiny_run, monkeypatch):
    """With checkpointing each LM block runs twice per step (forward, then again in backward) and the
    gradients reaching the queries are the same. (Counted on the block's MLP forward: module hooks do
    not fire during the recomputation.)"""
    pipe = pipeline.load_run(tiny_run, need=("clip", "understand", "generate"))
    lm, gen = pipe.vlm.lm, pipe.generator
    ids, lens, _ = blip3o.encode_prompts(pipe.tokenizer, ["a photo of a red circle", "a photo of two squares"])
    calls, mlp = [], lm.get_decoder().layers[0].mlp
    mlp_forward = mlp.forward

    def counted(*a, **k):
        calls.append(1)
        return mlp_forward(*a, **k)

    monkeypatch.setattr(mlp, "forward", counted)

    def query_grad():
        gen.queries.grad = None
        with torch.enable_grad():
            gen.queries.requires_grad_(True)
            gen.condition(lm, ids, lens).square().sum().backward()
        return gen.queries.grad.clone()

    lm.train()  # as in fit(); transformers checkpoints only in train mode (the toy LM has no dropout)
    plain = query_grad()
    assert len(calls) == 1
    calls.clear()
    train.enable_grad_checkpointing(lm)
    # Recomputing the forward in backward runs the same ops on the same shapes: default fp32 tolerance.
    torch.testing.assert_close(query_grad(), plain)
    assert len(calls) == 2


def test_grad_checkpointing_flag_trains(run, capsys):
    assert train.main([*GENERATE, "--out", str(run), "--steps", "2", "--batch-size", "4",
                       "--grad-checkpointing"]) == 0
    assert len(history(run)) == 2


@pytest.mark.slow  # torch.compile: a minute of compilation on a CPU
def test_compile_flag_trains_the_same_curve(run, tmp_path):
    """--compile (each Next-DiT block through torch.compile) trains the same numbers as eager."""
    compiled = tmp_path / "compiled"
    shutil.copytree(run, compiled)
    args = [*GENERATE, "--steps", "2", "--batch-size", "4"]
    assert train.main([*args, "--out", str(run)]) == 0
    assert train.main([*args, "--out", str(compiled), "--compile"]) == 0
    assert_same_curve(history(compiled), history(run))


# ----------------------------------------------------------------------------------------------------
# Streamed data (--data): WebDataset shards or an image folder
# ----------------------------------------------------------------------------------------------------


def write_toy_shards(folder, n: int, per_shard: int) -> list[str]:
    """Shapes-world samples as tar shards; sample i % 10 == 3 has a corrupt image, i % 10 == 7 no caption."""
    samples = []
    for i in range(n):
        scene = data.make_scene(i, seed=5)
        sample = {"__key__": f"{i:05d}", "png": data.encode_image(data.draw(scene)), "txt": scene.caption}
        if i % 10 == 3:
            sample["png"] = b"\x89PNG not really"
        if i % 10 == 7:
            del sample["txt"]
        samples.append(sample)
    return write_shards(samples, str(folder), per_shard=per_shard)


def test_expand_braces():
    assert data.expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert data.expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]


def test_shards_train_and_resume_at_the_saved_position(run, tmp_path, monkeypatch, capsys):
    """Toy preset on tiny shards: bad samples skipped and counted in the log, the per-rank position in
    the checkpoint, and a run interrupted after step 2 resumes reading exactly where it stopped."""
    shards = write_toy_shards(tmp_path / "shards", n=30, per_shard=10)
    args = [*GENERATE, "--steps", "4", "--batch-size", "4", "--ckpt-every", "2", "--data",
            str(Path(shards[0]).parent / "*.tar")]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    shutil.copytree(run, whole)
    shutil.copytree(run, resumed)
    assert train.main([*args, "--out", str(whole)]) == 0
    out = capsys.readouterr().out
    # 30 samples, 24 good: 4 steps x 4 = 16 read after 20 samples (2 bad images, 2 without caption).
    assert "16 samples read, 4 skipped (bad_image 2, missing_caption 2)" in out
    state = json.loads((whole / "generate" / "flow-clip" / "meta.json").read_text())["state"]["data"]
    assert state == {"world": 1, "ranks": [{"epoch": 0, "position": 20, "truncated": 0, "ok": 16,
                                            "skipped": {"bad_image": 2, "missing_caption": 2}}]}

    crash_after_checkpoint(monkeypatch, at_step=2)
    with pytest.raises(Interrupt):
        train.main([*args, "--out", str(resumed)])
    monkeypatch.undo()
    saved = json.loads((resumed / "generate" / "flow-clip" / "meta.json").read_text())["state"]["data"]
    assert saved["ranks"][0]["position"] == 10 and saved["ranks"][0]["ok"] == 8
    assert train.main([*args, "--out", str(resumed)]) == 0
    assert_same_curve(history(resumed), history(whole))
    final = json.loads((resumed / "generate" / "flow-clip" / "meta.json").read_text())["state"]["data"]
    assert final == state


def test_stream_wraps_around_for_more_passes(run, tmp_path, capsys):
    shards = write_toy_shards(tmp_path / "shards", n=10, per_shard=5)  # 8 good samples
    assert train.main([*GENERATE, "--out", str(run), "--steps", "3", "--batch-size", "4", "--data",
                       str(Path(shards[0]).parent / "*.tar")]) == 0
    assert "1 full passes" in capsys.readouterr().out  # 12 samples = 1.5 passes


def test_image_folder_with_captions(run, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    for i in range(6):
        scene = data.make_scene(i, seed=3)
        (folder / f"{i}.png").write_bytes(data.encode_image(data.draw(scene)))
        lines.append(json.dumps({"file": f"{i}.png", "caption": scene.caption}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines + ['{"file": "missing.png", "caption": "x"}']))
    assert train.main([*GENERATE, "--out", str(run), "--steps", "2", "--batch-size", "3", "--data",
                       str(folder), "--captions", str(tmp_path / "captions.jsonl")]) == 0


@pytest.mark.parametrize("case", ["no-match", "missing-shard", "all-bad", "vae-target"])
def test_data_errors_are_one_line(case, run, tmp_path, capsys):
    bad = tmp_path / "bad"
    write_shards([{"__key__": f"{i}", "png": b"junk", "txt": "a red circle"} for i in range(5)],
                      str(bad), per_shard=5)
    spec, extra, expect = {
        "no-match": (str(tmp_path / "none" / "*.tar"), [], "matches no files"),
        "missing-shard": (str(bad / "shard-{00000..00001}.tar"), [], "no shard"),
        "all-bad": (str(bad / "*.tar"), [], "no readable samples"),
        "vae-target": (str(bad / "*.tar"), ["--target", "vae"], "--target clip"),
    }[case]
    assert train.main([*GENERATE, "--out", str(run), "--steps", "1", "--batch-size", "2", "--data", spec,
                       *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "\n" not in err
