"""The paper's design study at toy scale: the three designs of Figure 3 train and sample,
MSE gives one sample per prompt while flow matching spreads, sequential training leaves the LM
bit-identical while joint training changes it, and `ablation.py study --quick` writes its files.

Models come from tiny runs (2 training steps per stage): these tests check the plumbing and the
properties that hold at any quality, not what a trained model reaches.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import blip3o
import ablation
import pipeline
import train
from conftest import train_tiny

BASE_STAGES = ("clip", "understand", "decoder", "vae")
DATA = {"images": 48, "seed": 0}  # what conftest's train_tiny trains on
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def base_run(tiny_run, folder: Path) -> Path:
    """A fresh run folder with the session run's stage-1 pieces only (no generator trained yet)."""
    for stage in BASE_STAGES:
        shutil.copytree(Path(tiny_run) / stage, folder / stage)
    return folder


def last_json(stdout: str) -> dict:
    lines = stdout.rstrip("\n").split("\n")
    assert len(lines) > 1, "a table is printed above the JSON line"
    return json.loads(lines[-1])


# --- the pieces, no training ------------------------------------------------------------------------


def test_mean_pairwise_distance():
    same = torch.ones(3, 4, 5)  # 3 prompts, 4 identical samples each
    assert ablation.mean_pairwise_distance(same) == 0.0
    two = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])  # one prompt, two samples 5 apart
    # Small exact values (a 3-4-5 triangle): pytest.approx's default 1e-6 relative covers fp32 sqrt.
    assert ablation.mean_pairwise_distance(two, rms=False) == pytest.approx(5.0)
    assert ablation.mean_pairwise_distance(two) == pytest.approx(5.0 / 2 ** 0.5)
    # The mean over pairs: three samples on a line at 0, 1, 3 -> (1 + 3 + 2) / 3
    line = torch.tensor([0.0, 1.0, 3.0]).reshape(1, 3, 1)
    assert ablation.mean_pairwise_distance(line) == pytest.approx(2.0)


def test_joint_refuses_other_designs(tmp_path):
    assert train.main(["--stage", "joint", "--loss", "mse", "--out", str(tmp_path), "--quiet"]) == 2


@pytest.mark.parametrize("argv", [["diversity", "--variants", "flow-pixels"], ["diversity", "--seeds", "1"],
                                  ["study", "--every", "0"]])
def test_cli_rejects_bad_flags(argv):
    with pytest.raises(SystemExit) as e:
        ablation.parse_args(argv)
    assert e.value.code == 2


def test_ablation_refuses_its_own_run_folder(tiny_run, capsys):
    assert ablation.main(["study", "--run", str(tiny_run), "--out", str(tiny_run), "--quick"]) == 2
    assert "--out must not be the run folder" in capsys.readouterr().err


# --- training and sampling, tiny ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(ablation.DESIGNS))
def test_each_design_trains_and_samples(variant, tiny_run, tmp_path):
    run = base_run(tiny_run, tmp_path)
    loss, target = variant.split("-")
    train_tiny(run, "--stage", "generate", "--loss", loss, "--target", target)
    pipe = pipeline.load_run(run, variant, need=("clip", "understand", "generate"))
    assert (pipe.generator.loss_type, pipe.target) == (loss, target)
    images = pipe.generate_images(["a photo of a red circle", "a photo of two squares"], steps=2,
                                  rng=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_joint_starts_where_sequential_stage_2_starts(tiny_run):
    def initial(stage):
        args = train.parse_args(["--stage", stage, "--out", str(tiny_run), "--images", "48", "--quiet"])
        args.config = blip3o.get_config(args.preset)
        train.seed_init(args, stage)  # as train.main
        return train.PLANS[stage](args, CPU).model.inner

    sequential, joint = initial("generate"), initial("joint")
    for name, tensors in (("generator", sequential.generator.state_dict()),
                          ("vlm", sequential.vlm.state_dict())):
        other = getattr(joint, name).state_dict()
        assert all(torch.equal(v, other[k]) for k, v in tensors.items()), name  # one seed, one init
    assert all(p.requires_grad for p in joint.vlm.parameters())
    assert not any(p.requires_grad for p in sequential.vlm.parameters())


def test_joint_changes_the_lm_sequential_leaves_it_bit_identical(tiny_run, tmp_path):
    run = base_run(tiny_run, tmp_path)
    stage1 = pipeline.load_checkpoint(run / "understand", stage="understand")[1]

    sequential = ablation.train_segment(run, ["--stage", "generate"], 2, 4, DATA, CPU, restart=True)
    assert ablation.lm_change(sequential.vlm, stage1) == (True, 0.0)
    assert not any(p.requires_grad for p in sequential.vlm.parameters())

    joint = ablation.train_segment(run, ["--stage", "joint"], 2, 4, DATA, CPU, restart=True)
    identical, change = ablation.lm_change(joint.vlm, stage1)
    assert not identical and change > 0
    meta, saved, _ = pipeline.load_checkpoint(run / "joint", stage="joint")
    assert {"loss_und", "loss_gen"} <= set(meta["state"]["history"][-1])  # both tasks in every step

    # load_run rebuilds the joint model from RUN/joint alone: the EMA of the LM it trained, not stage 1's.
    pipe = pipeline.load_run(run, "joint", need=("clip", "understand", "generate"))
    ema_embedding = saved["ema.vlm.lm.model.embed_tokens.weight"]  # copied through safetensors: bit-equal
    assert torch.equal(pipe.vlm.lm.get_input_embeddings().weight, ema_embedding)
    assert torch.equal(pipe.vlm.lm.lm_head.weight, ema_embedding)  # the tied output layer: the same EMA
    assert not torch.equal(pipe.vlm.projector.linear_1.weight, stage1["vlm.projector.linear_1.weight"])
    assert pipe.generate_tokens(["a photo of a red circle"], steps=2).shape == (1, 64, pipe.generator.target_dim)


def test_diversity_mse_is_deterministic_flow_is_not(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("geneval-*"))
    rc = ablation.main(["diversity", "--run", str(run), "--seeds", "3", "--steps", "2",
                          "--prompts", "a photo of a red circle", "a photo of two squares"])
    assert rc == 0
    m = last_json(capsys.readouterr().out)
    assert set(m["variants"]) == set(ablation.DESIGNS) and m["seeds"] == 3
    assert all(v == 0.0 for v in m["variants"]["mse-clip"].values())  # one prompt, one output
    for variant in ("flow-clip", "flow-vae"):
        assert all(v > 0 for v in m["variants"][variant].values())
    assert m["mse_over_flow"]["tokens"] == 0.0
    assert Image.open(m["picture"]).size[0] > 0


def test_ablation_quick_writes_table_plot_and_json(tiny_run, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert ablation.main(["study", "--run", str(tiny_run), "--out", str(out), "--quick"]) == 0
    printed = last_json(capsys.readouterr().out)
    saved = json.loads((out / "ablation.json").read_text())
    assert printed == saved
    assert set(saved["designs"]) == {*ablation.DESIGNS, "joint"}
    for d in saved["designs"].values():
        assert [p["step"] for p in d["curve"]] == [1, 2]  # --quick: 2 steps, scored every step
        assert all(0 <= p["geneval"] <= 1 and 0 <= p["retrieval"] <= 1 for p in d["curve"])
    f = saved["findings"]
    assert f["3_sequential_lm_bit_identical"] and f["3_sequential_understanding_unchanged"]
    assert not saved["designs"]["joint"]["lm_bit_identical"]
    md = (out / "ablation.md").read_text()
    assert "| CLIP + Flow (BLIP3-o) |" in md and "![score vs steps](ablation.png)" in md
    with Image.open(out / "ablation.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    # The run's finished pieces were copied in, not linked, and the run itself is untouched.
    assert not (out / "understand").is_symlink() and not (Path(tiny_run) / "ablation.json").exists()


def test_ablation_script_smoke():
    """ablation.py as a user runs it (a fresh interpreter): a bad flag is one line, exit status 2."""
    from conftest import run_script

    res = run_script("ablation.py", "study", "--every", "0")
    assert res.returncode == 2 and res.stderr == "error: --every must be at least 1, got 0\n"
