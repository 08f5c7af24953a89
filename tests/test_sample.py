"""sample.py: GenEval's folder layout written exactly, the real GenEval prompt file accepted unchanged,
text -> image grids, answers, reconstructions, released-style weights, and one-line CLI errors.

The models come from the session's `tiny_run` (2 training steps per stage): these tests check that the
pieces fit and the files are right, not what the model learned. Few sampler steps keep them fast.
"""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import blip3o
import data
import pipeline
import sample
from conftest import GENEVAL_METADATA, in_process, make_release, run_script

ROOT = Path(__file__).resolve().parent.parent
REAL_GENEVAL = Path(GENEVAL_METADATA)
FAST = ["--steps", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args):
    """sample.py's main() in this process: exit status, stdout, stderr (test_help runs the script)."""
    return in_process("sample.py", *args)


def cli(*args) -> int:
    """sample.main in-process (no interpreter start-up), arguments as the shell would pass them."""
    return sample.main([str(a) for a in args])


def write_image(path, split="test", index=0):
    Image.fromarray(data.draw(data.make_scene(index, split))).save(path)
    return path


def test_geneval_layout_is_exact(tiny_run, tmp_path, capsys):
    records = data.geneval_prompts("test", n_per_tag=1)[:3]
    lines = [json.dumps(r) for r in records]
    meta = tmp_path / "prompts.jsonl"
    meta.write_text("\n".join(lines) + "\n")
    out = tmp_path / "gen"
    rc = cli("--run", tiny_run, "--geneval", meta, "--outdir", out, "--per-prompt", "2", "--grid", *FAST)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002"]
    for i, line in enumerate(lines):
        folder = out / f"{i:05d}"
        assert (folder / "metadata.jsonl").read_text() == line + "\n"  # the input line, unchanged
        pngs = sorted(p.name for p in (folder / "samples").iterdir())
        assert pngs == ["0000.png", "0001.png"]
        with Image.open(folder / "samples" / "0000.png") as im:
            assert im.mode == "RGB" and im.size == (32, 32)
        assert (folder / "grid.png").is_file()
    assert "0 are outside the shapes world" in capsys.readouterr().out


def test_real_geneval_file_goes_through(tiny_run, tmp_path, capsys):
    """The official prompt file, unchanged (its first 12 lines: all outside the shapes world)."""
    head = REAL_GENEVAL.read_text().splitlines(keepends=True)[:12]
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(head))
    out = tmp_path / "geneval"
    assert cli("--run", tiny_run, "--geneval", meta, "--outdir", out, "--per-prompt", "1", *FAST) == 0
    folders = sorted(out.iterdir())
    assert len(folders) == 12
    for line, folder in zip(head, folders):
        assert (folder / "metadata.jsonl").read_text() == line
        assert [p.name for p in (folder / "samples").iterdir()] == ["0000.png"]
        assert not (folder / "grid.png").exists()  # optional, off by default
    assert "12 are outside the shapes world" in capsys.readouterr().out


def test_text_to_image_grid_is_deterministic(tiny_run, tmp_path):
    prompts = ["a photo of a red circle", "a photo of two squares"]
    args = ["--run", tiny_run, "--num-samples", "3", "--seed", "5", *FAST]
    for p in prompts:
        args += ["--prompt", p]
    assert cli(*args, "--out", tmp_path / "a.png") == 0
    assert cli(*args, "--out", tmp_path / "b.png") == 0
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size == b.size and a.height == 2 * (4 * 32 + 2) + 2  # two rows of x4 images
        assert a.tobytes() == b.tobytes()


def test_generate_grid_columns_follow_seeds(tiny_run):
    """Sample j of every prompt uses seed + j: seed 0 with 2 samples and seed 1 with 1 share a column."""
    pipe = pipeline.load_run(tiny_run)
    prompts = ["a photo of a circle", "a photo of a blue square"]
    two, tokens = sample.generate_grid(pipe, prompts, 2, seed=0, steps=2, guidance=blip3o.GUIDANCE)
    one, _ = sample.generate_grid(pipe, prompts, 1, seed=1, steps=2, guidance=blip3o.GUIDANCE)
    assert two.shape == (2, 2, 3, 32, 32) and tokens.shape == (2, 2, 64, pipe.config.clip.scene_width)
    # The same noise through the same modules and shapes, in one process: bit-equal.
    assert torch.equal(two[:, 1], one[:, 0])
    # Another seed, another sample (in the features: a 2-step decoder draws nearly the same grey for any)
    assert (tokens[:, 0] - tokens[:, 1]).abs().max() > 1e-2


def test_answer_caption_and_reconstruct(tiny_run, tmp_path, capsys):
    img = write_image(tmp_path / "scene.png")
    assert cli("--run", tiny_run, "--image", img, "--question", "what color is the circle ?") == 0
    assert "Q: what color is the circle ?" in capsys.readouterr().out
    sampled = []
    for _ in range(2):
        assert cli("--run", tiny_run, "--image", img, "--caption", "--temperature", "1.0",
                            "--seed", "3") == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] and f"Q: {data.caption_question}" in sampled[0]
    out = tmp_path / "recon.png"
    assert cli("--run", tiny_run, "--reconstruct", img, "--out", out) == 0
    with Image.open(out) as im:
        assert im.height == 4 * 32 + 4  # one row: original and reconstruction side by side


@pytest.mark.parametrize("case", ["missing run", "missing checkpoint", "corrupt image", "empty prompt",
                                  "zero steps", "negative guidance", "no samples", "bad flag"])
def test_cli_errors_are_one_line(case, tiny_run, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a PNG")
    args = {
        "missing run": ["--run", tmp_path / "nope", "--prompt", "a photo of a circle"],
        "missing checkpoint": ["--run", empty, "--prompt", "a photo of a circle"],
        "corrupt image": ["--run", tiny_run, "--image", bad, "--caption"],
        "empty prompt": ["--run", tiny_run, "--prompt", "  "],
        "zero steps": ["--run", tiny_run, "--prompt", "a photo of a circle", "--steps", "0"],
        "negative guidance": ["--run", tiny_run, "--prompt", "a photo of a circle", "--guidance", "-1"],
        "no samples": ["--run", tiny_run, "--prompt", "a photo of a circle", "--num-samples", "0"],
        "bad flag": ["--run", tiny_run, "--prompt", "a photo of a circle", "--no-such-flag"],
    }[case]
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_help_shows_examples():
    """The smoke test of sample.py as a user runs it: a fresh interpreter."""
    res = run_script("sample.py", "--help")
    assert res.returncode == 0
    assert "python sample.py --prompt" in res.stdout and "--geneval" in res.stdout


# --- released BLIP3-o weights: a synthetic checkpoint laid out like the release ----------------------


def test_official_checkpoint_features(tmp_path, capsys):
    from safetensors.torch import load_file

    width = 16
    ckpt, backbone = make_release(tmp_path, width)
    out = tmp_path / "feats.safetensors"
    args = ["--official-checkpoint", ckpt, "--backbone", backbone, "--prompt", "a photo of a red circle",
            "--prompt", "a photo of two squares", "--num-samples", "2", "--steps", "3", "--out", out]
    assert cli(*args) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "model.embed_tokens" in printed  # the loader's report
    feats = load_file(out)["features"]
    assert feats.shape == (2, 2, 64, width) and torch.isfinite(feats).all()
    assert (feats[:, 0] - feats[:, 1]).abs().max() > 1e-3  # two seeds, two samples
    assert (feats[0] - feats[1]).abs().max() > 1e-3  # the prompt reaches the features
    assert cli(*args) == 0  # deterministic up to the kernels a fresh load picks (layout, alignment): fp32
    torch.testing.assert_close(load_file(out)["features"], feats, rtol=1e-5, atol=1e-5)


def test_official_checkpoint_incomplete_is_refused(tmp_path, capsys):
    ckpt, backbone = make_release(tmp_path, 16, drop="model.dit.model.layers.1.gate")
    rc = cli("--official-checkpoint", ckpt, "--backbone", backbone, "--prompt", "a photo of a circle",
             "--features-only")  # (without it, the missing diffusion-decoder/ is reported first)
    assert rc == 2
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # (above it: save_pretrained's progress)
    assert err.startswith("error: ") and "1 missing" in err


def test_official_checkpoint_tokenizer_and_img_row(tmp_path, capsys):
    """The checkpoint's own tokenizer (it has [IMG]), [IMG]'s trained row from the checkpoint; a tokenizer
    without [IMG] (the stock backbone's, once the checkpoint's is gone) is refused in one line."""
    from safetensors import safe_open

    ckpt, backbone = make_release(tmp_path, 16)
    _, lm, tok = sample.load_official(ckpt, backbone, torch.device("cpu"))
    img = tok.get_vocab()["[IMG]"]
    key = "model.embed_tokens.weight"
    (shard,) = [f for f in ckpt.glob("*.safetensors") if key in safe_open(f, "pt").keys()]
    row = safe_open(shard, "pt").get_tensor(key)[img]
    assert torch.equal(lm.get_input_embeddings().weight[img], row)
    assert f"[IMG] = id {img}, its embedding from the checkpoint" in capsys.readouterr().out
    for name in ("tokenizer_config.json", "tokenizer.json"):
        (ckpt / name).unlink()
    rc = sample.main(["--official-checkpoint", str(ckpt), "--backbone", str(backbone), "--prompt", "a circle",
                      "--features-only"])
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert rc == 2 and err.startswith("error: ") and f"the tokenizer in {backbone} has no [IMG] token" in err


# --- the released model's generation input, exactly as BLIP3o's inference builds it ---------------------


def qwen_style_tokenizer(folder):
    """A saved Qwen2 tokenizer in miniature: byte-level BPE over the 256 byte symbols, no merges (each
    byte is one token, so the expected ids can be spelled piece by piece), <|endoftext|>, the ChatML
    tokens, and BLIP3o's [IMG], [/IMG], <image> added after them as its training adds them."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AutoTokenizer, Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[])
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.add_tokens(["[IMG]", "[/IMG]", "<image>"], special_tokens=True)
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


CAPTIONS = ["a cat", "two dogs playing on a beach at sunset"]  # different lengths: right padding


def test_official_prompt_ids_are_the_official_sequence(tmp_path):
    tok = qwen_style_tokenizer(tmp_path)
    vocab = tok.get_vocab()
    start, end, img = vocab["<|im_start|>"], vocab["<|im_end|>"], vocab["[IMG]"]
    assert img == 259  # looked up by name: 151665 only in the released tokenizer

    def text(s):  # plain text, byte by byte
        ids = tok(s)["input_ids"]
        assert len(ids) == len(s.encode())
        return ids

    ids, lens = sample.official_prompt_ids(tok, CAPTIONS)
    assert ids.shape == (2, max(lens)) and lens[0] < lens[1]
    for b, caption in enumerate(CAPTIONS):
        # conversation.py's conv_qwen through inference.py's add_template, then generate_image's [IMG]
        expected = ([start] + text("system\nYou are a helpful assistant.") + [end] + text("\n")
                    + [start] + text(f"user\nPlease generate image based on the following caption: {caption}")
                    + [end] + text("\n") + [start] + text("assistant\n") + [img])
        assert lens[b] == len(expected) and ids[b, :lens[b]].tolist() == expected
        assert (ids[b, lens[b]:] == tok.pad_token_id).all()
    ids, lens = sample.official_prompt_ids(tok, [" "], template=False)  # the decoder's negative prompt
    assert ids.tolist() == [text(" ") + [img]] and lens.tolist() == [2]


def test_official_queries_read_their_own_prompt(tmp_path):
    """Batched and right-padded, each caption's queries sit at positions len .. len + 63 right after its own
    [IMG] and read what the official generate_image reads for that caption alone: the LM over [prompt ids,
    64 queries] with an all-ones mask and default positions, the last 64 final (post-norm) hidden states."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = qwen_style_tokenizer(tmp_path)
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                      max_position_embeddings=512)).eval()
    gen = blip3o.Generator(blip3o.get_config("toy"), lm_dim=32)
    ids, lens = sample.official_prompt_ids(tok, CAPTIONS)
    with torch.no_grad():
        cond = gen.condition(lm, ids, lens)  # (2, 64, 32)
        for b, caption in enumerate(CAPTIONS):
            alone = torch.tensor([tok(sample.OFFICIAL_TEMPLATE.format(caption))["input_ids"] + [259]])
            seq = torch.cat([lm.model.embed_tokens(alone), gen.queries[None]], 1)  # (1, T_b + 64, 32)
            out = lm.model(inputs_embeds=seq, attention_mask=torch.ones(seq.shape[:2]),
                           output_hidden_states=True)
            torch.testing.assert_close(cond[b], out.hidden_states[-1][0, -64:], rtol=1e-5, atol=1e-5)


def test_grid_labels_keep_their_spaces():
    """PIL's default font draws a space 2 px wide ("a photoofacircle"); labels are spaced word by word."""
    from PIL import Image, ImageDraw, ImageFont

    font, probe = ImageFont.load_default(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    spaced, joined = sample.text_width(probe, "a photo of a circle", font), sample.text_width(probe, "aphotoofacircle", font)
    assert spaced - joined == 4 * sample.WORD_GAP >= 4 * 4
    wide = sample.image_grid([[torch.zeros(3, 32, 32)]], ["a photo of a circle"])
    narrow = sample.image_grid([[torch.zeros(3, 32, 32)]], ["aphotoofacircle"])
    assert wide.width - narrow.width == 4 * sample.WORD_GAP
