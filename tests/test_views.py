"""Inside the sampler (issue 37): the trajectory is the sampler's own, the word maps are distributions over
the prompt, and the guidance / steps sweep scores as `eval.py toygeneval` does.

The models come from the session's `tiny_run` (2 training steps per stage): these tests check what the views
are, not what they show.
"""
import json
import shutil

import pytest
import torch
from PIL import Image

import blip3o
import data
import eval as evaluation
import pipeline
import sample
from conftest import in_process

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a red circle", "a photo of a circle below a square"]


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return pipeline.load_run(tiny_run, need=("clip", "understand", "generate", "decoder"))


def test_clean_guess_of_a_straight_flow_is_its_end():
    """v = (x* - x) / (1 - t) flows straight to x*: at every step x_t lies on the line and the guess
    x_t + (1 - t) v is x* itself."""
    target, x0, seen = torch.randn(2, 64, 3), torch.randn(2, 64, 3), []
    field = lambda x, t, c: (target - x) / (1 - t[:, None, None])  # noqa: E731
    blip3o.euler_sample(field, torch.zeros(2, 1, 4), 64, 3, steps=5, guidance=1.0, x0=x0,
                        on_step=lambda t, x, guess: seen.append((t, x, guess)))
    assert [t for t, _, _ in seen] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8], abs=1e-12)  # i * dt
    for t, x, guess in seen:
        torch.testing.assert_close(x, (1 - t) * x0 + t * target)  # fp32 rounding only (default tol)
        torch.testing.assert_close(guess, target)


def tile(grid: Image.Image, row: int, col: int, cols: int, size: int = 4 * 32, pad: int = 2):
    """The pixels of image (row, col) in an image_grid of `cols` columns (labels sit left of them)."""
    x = grid.width - (cols - col) * (size + pad)
    y = pad + row * (size + pad)
    return grid.crop((x, y, x + size, y + size)).tobytes()


def test_trajectory_ends_on_the_sample(tiny_run, tmp_path):
    """sample.py --trajectory's last column is sample.py --prompt's picture, bit for bit (one machine)."""
    args = ["--run", tiny_run, "--num-samples", "2", "--seed", "3", "--steps", "3"]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert in_process("sample.py", *args, "--out", tmp_path / "samples.png").returncode == 0
    assert in_process("sample.py", *args, "--trajectory", "--out", tmp_path / "t.png").returncode == 0
    with Image.open(tmp_path / "samples.png") as grid, Image.open(tmp_path / "t.png") as strip:
        assert strip.height == 8 * (4 * 32 + 2) + 2  # 4 samples: x_t and clean guess rows
        for p in range(2):
            for j in range(2):  # the strip's columns: t = 0, 1/3, 2/3, 1
                assert tile(strip, 2 * (2 * p + j), 3, 4) == tile(grid, p, j, 2)
    with Image.open(tmp_path / "t.gif") as gif:
        assert gif.n_frames == 3 + 1  # t = 0, 1/3, 2/3 and the sample


def test_trajectory_steps_are_the_samplers(pipe):
    """The last Euler step's clean guess x + (1 - t) v is where that step lands, x + dt v: the sample."""
    views = sample.trajectory(pipe, PROMPTS, 2, 0, 4, blip3o.GUIDANCE)
    assert views.shape == (2, 2, 5, 3, 32, 32, 3) and views.dtype == torch.uint8
    # (1 - t) and dt differ in the last bit, so the decoded pixels may differ by one level.
    assert (views[:, :, -2, 1].int() - views[:, :, -1, 1].int()).abs().max() <= 1
    images, _ = sample.generate_grid(pipe, PROMPTS, 2, 0, 4, blip3o.GUIDANCE)
    assert torch.equal(views[:, :, -1, 0], data.to_uint8(images))


def test_kept_attention_probabilities_are_sdpas():
    torch.manual_seed(0)
    attn = blip3o.Attention(32, 16, num_heads=4, num_kv_heads=2, out_proj=True)
    x, context = torch.randn(2, 64, 32), torch.randn(2, 7, 16)
    rope = blip3o.rope_2d(8, 8, 10000.0)
    out = attn(x, context, rope, rope_keys=False)
    attn.keep_probs = True
    assert torch.equal(attn(x, context, rope, rope_keys=False), out)  # the output is untouched
    v = attn.to_v(context).unflatten(-1, (2, 8)).transpose(1, 2).repeat_interleave(2, dim=1)  # (B, H, L, hd)
    torch.testing.assert_close(attn.probs @ v, out)  # fp32 rounding of two summation orders (default tol)


def test_word_maps_are_distributions_over_the_prompt(pipe):
    images, maps = sample.word_maps(pipe, PROMPTS, 0, 2, blip3o.GUIDANCE)
    grid, _ = sample.generate_grid(pipe, PROMPTS, 1, 0, 2, blip3o.GUIDANCE)
    assert torch.equal(images, grid[:, 0])  # the maps' pictures are the sampler's, unchanged by watching
    ids, lens, _ = blip3o.encode_prompts(pipe.tokenizer, PROMPTS)
    for (m, queries, tokens), n, prompt in zip(maps, lens.tolist(), PROMPTS):
        assert m.shape == (64, n) and queries.shape == (64, n) and len(tokens) == n
        assert tokens[-len(prompt.split()):] == prompt.split()  # the caption closes the prompt
        assert (m >= 0).all() and (queries >= 0).all()
        # Each image token's weights over the prompt's tokens sum to 1 (fp32 rounding: 1e-5).
        torch.testing.assert_close(m.sum(-1), torch.ones(64), atol=1e-5, rtol=0)
        torch.testing.assert_close(queries.sum(-1), torch.ones(64), atol=1e-5, rtol=0)
    assert pipe.vlm.lm.config._attn_implementation == "sdpa"  # the LM is back on its training path
    assert not any(block.attn2.keep_probs for block in pipe.generator.dit.layers)


def test_sweep_scores_as_toygeneval(pipe, tmp_path, monkeypatch):
    monkeypatch.setitem(evaluation.REPORT, "steps", 3)  # the sweeps' fixed steps; few, to be quick
    monkeypatch.setattr(evaluation, "SWEEP_GUIDANCE", (1.0, 2.0))
    monkeypatch.setattr(evaluation, "SWEEP_STEPS", (2, 3))
    records = data.geneval_prompts("test", 1)
    scores, swept = evaluation.sweep(pipe, records, 2)
    assert [x for x, *_ in scores["guidance"]] == [1.0, 2.0] and [x for x, *_ in scores["steps"]] == [2, 3]
    assert len(swept) == 2 and swept[0][0].shape == (len(records), 2, 32, 32, 3)
    for axis, (x, decoded, said), steps, guidance in (("guidance", scores["guidance"][1], 3, 2.0),
                                                      ("steps", scores["steps"][0], 2, blip3o.GUIDANCE)):
        m, *_ = evaluation.eval_toygeneval(pipe, tmp_path, "flow-clip", 2, 1, steps, guidance, quiet=True)
        # One scorer, the same pictures: equal but for the order the tags are averaged in.
        assert decoded == pytest.approx(m["overall"], abs=1e-12), axis
        assert said == pytest.approx(m["tokens_say"]["overall"], abs=1e-12), axis


def test_commands_write_their_files(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("geneval-*", "REPORT.md", "metrics.json"))
    monkeypatch.setitem(evaluation.REPORT, "steps", 2)  # few steps: the views' plumbing, in seconds
    monkeypatch.setattr(evaluation, "SWEEP_STEPS", (1, 2))
    res = in_process("eval.py", "views", "--run", run, "--per-tag", "1", "--samples", "1")
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert [len(m["sweep"][axis]) for axis in ("guidance", "steps")] == [6, 2] and m["prompts"] == 6
    for name in ("trajectory.png", "trajectory.gif", "words.png", "sweep.png", "sweep_plot.png"):
        assert (run / name).is_file(), name
    out = tmp_path / "words.png"
    assert in_process("sample.py", "--run", run, "--prompt", PROMPTS[1], "--words", "--steps", "2",
                      "--out", out).returncode == 0
    assert out.is_file()
    res = in_process("sample.py", "--run", run, "--prompt", PROMPTS[1], "--words", "--variant", "mse-clip")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
