"""Shared pytest setup: the repository root on sys.path, so tests import `blip3o`, `data`, ... directly."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The real GenEval prompt set, unchanged (MIT licence, tests/data/GENEVAL_SOURCE.md), kept in the
# repository so a bare clone tests it too.
GENEVAL_METADATA = os.path.join(ROOT, "tests", "data", "geneval_evaluation_metadata.jsonl")

import contextlib
import importlib
import io
import itertools
import subprocess
import tarfile

import pytest
import torch


TINY = ["--steps", "2", "--batch-size", "4", "--images", "48", "--quiet", "--ckpt-every", "0"]


def train_tiny(out, *stage_args):
    """Run train.py in-process with tiny sizes (seconds): the real code path, a few steps."""
    import train

    rc = train.main([*stage_args, "--out", str(out), *TINY])
    assert rc == 0, f"train.py {' '.join(stage_args)} exited {rc}"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A complete toy run (every stage, 2 steps each): checkpoints for sample.py / eval.py tests.

    Not trained to any quality: it checks that pieces fit together, not what they learned.
    """
    out = tmp_path_factory.mktemp("run")
    for stage in ("clip", "understand", "decoder", "vae"):
        train_tiny(out, "--stage", stage)
    train_tiny(out, "--stage", "generate", "--loss", "flow", "--target", "clip")
    train_tiny(out, "--stage", "generate", "--loss", "mse", "--target", "clip")
    train_tiny(out, "--stage", "generate", "--loss", "flow", "--target", "vae")
    return out


@pytest.fixture
def run(tiny_run, tmp_path):
    """A fresh run folder holding only tiny_run's CLIP and stage-1 LM: a generation stage starts from scratch."""
    import shutil

    out = tmp_path / "run"
    for stage in ("clip", "understand"):
        shutil.copytree(tiny_run / stage, out / stage)
    return out


@pytest.fixture
def one_thread():
    """Two shared cores: one torch thread is kinder to neighbours (and faster when they are busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_script(script: str, *args, timeout: int = 300):
    """Run one of the repository's scripts as a user would (one OpenMP thread); the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


def in_process(script, *args, env=None):
    """The script's main() in this process, the way `cli` runs it in a fresh one: the exit status,
    stdout and stderr (tests of what a script says need no interpreter start-up each)."""
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = importlib.import_module(script.removesuffix(".py")).main([str(a) for a in args])
            except SystemExit as e:  # argparse errors
                rc = e.code
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(script, rc, out.getvalue(), err.getvalue())


def make_release(tmp_path, clip_width: int, drop: str | None = None):
    """A tiny released-style checkpoint (queries + DiT under official names, the input embeddings, two
    shards, its own tokenizer with [IMG]) and a tiny Qwen2 backbone folder whose tokenizer, like the stock
    Qwen's, has the ChatML tokens but no [IMG]. Both tokenizers: the toy one with those tokens added."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import blip3o
    import data

    torch.manual_seed(0)
    tok = blip3o.build_toy_tokenizer(data.VOCAB)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    backbone = tmp_path / "backbone"
    tok.save_pretrained(backbone)
    tok.add_tokens(["[IMG]", "[/IMG]"], special_tokens=True)  # BLIP3o's training adds these (and <image>)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                      max_position_embeddings=256, pad_token_id=0, bos_token_id=3,
                                      eos_token_id=2))
    lm.save_pretrained(backbone)
    dit = blip3o.NextDiT(blip3o.DiTConfig(in_channels=clip_width, hidden_size=32, num_layers=2, num_heads=2,
                                          num_kv_heads=2, cond_dim=32))
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name.endswith("gate"):
                p.normal_()  # open the cross-attention, so the prompt matters
    state = {"model.dit.model." + k: v.contiguous() for k, v in dit.state_dict().items()}
    state["model.latent_queries"] = torch.randn(1, 64, 32)
    state["model.embed_tokens.weight"] = torch.randn(len(tok), 32)  # skipped, but for [IMG]'s row
    if drop is not None:
        state.pop(drop)
    ckpt = tmp_path / "release"
    ckpt.mkdir()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, ckpt / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[1::2]}, ckpt / "model-00002-of-00002.safetensors")
    tok.save_pretrained(ckpt)
    return ckpt, backbone


def write_shards(samples, out_dir: str, per_shard: int, prefix: str = "shard") -> list[str]:
    """WebDataset-style shards for the tests: out_dir/{prefix}-00000.tar, ... -> their paths; samples are
    dicts {"__key__": key, ext: bytes | str (stored UTF-8)}, e.g. {"__key__": "1", "png": ..., "txt": "..."}."""
    os.makedirs(out_dir, exist_ok=True)
    samples, paths = iter(samples), []
    while chunk := list(itertools.islice(samples, per_shard)):
        paths.append(os.path.join(out_dir, f"{prefix}-{len(paths):05d}.tar"))
        with tarfile.open(paths[-1], "w") as tar:
            for sample in chunk:
                for ext, value in sample.items():
                    if ext == "__key__":
                        continue
                    payload = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return paths
