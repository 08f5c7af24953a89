"""Speed and memory of blip3o: the Next-DiT against diffusers and the machine, sampling, memory.

    python bench.py                              # everything, about 5-6 minutes on a 2-core laptop CPU
    python bench.py --only matmul,dit_toy        # a subset (names: see --help)
    python bench.py --only sampling --run out/toy  # text -> image speed of a trained run (default out/toy)
    python bench.py --only train_memory          # peak RAM of each toy training stage (~2.5 minutes)
    python bench.py --threads 1                  # pin torch's threads: on a machine shared with other jobs,
                                                 # 2 OpenMP threads on 2 busy cores can run 10x slower
    python bench.py --compile                    # torch.compile each block of both DiTs (regional)
    python bench.py --device cuda --dtype bf16 --only dit_8b --batch-8b 128 --no-peer --fused-adamw
                                                 # GPU: the blip3o-8b head's training step and its MFU

What it measures, in the order it runs:
- matmul:   the dense matmul FLOP/s torch reaches here at --dtype (fp32 by default): the machine's
  practical limit (on a GPU also at 8192^3 and at the 8B head's own shape).
- dit_toy / dit_mid: one Next-DiT training step (flow-matching loss, backward, AdamW) at the toy size
  (width 128, 4 layers, batch 64) and a mid size (width 512, 8 layers, batch 32), 64 tokens each:
  samples/s, FLOP/s from the FLOP count derived from the config (printed), the fraction of the matmul
  peak, and the same step with diffusers' LuminaNextDiT2DModel (+ the BLIP3-o condition MLP) at the same
  config, interleaved with ours; the speed ratio ours/theirs is the median over rounds. --dtype bf16
  runs the steps under bf16 autocast over fp32 weights, as train.py trains on CUDA.
- dit_8b:   (CUDA only; skipped elsewhere) the same step for the released blip3o-8b head (1.37B
  parameters, condition 64 x 3584) at --batch-8b; with --dtype bf16 its share of the bf16 matmul peak
  is the MFU. --no-peer leaves diffusers out (both 8B heads and their AdamW states need ~67 GB at
  batch 64); --fused-adamw and --compile are what train.py uses on a GPU (fused AdamW always on CUDA,
  --compile when asked).
- sampling: a trained run (--run, rebuilt with pipeline.load_run): text -> image images/s at the default
  settings (Pipeline.generate_images: 30 Euler steps with guidance 3.0 for the CLIP features, then one
  pass of the pixel decoder), and text -> CLIP features alone
  (Pipeline.generate_tokens), at batch 1 and 16 (--sample-batches); median of 3 repetitions. A run
  without its generation checkpoints is reported as skipped, with the command that trains it.
- memory:   peak resident memory of this process, and the memory of the real presets (blip3o-8b/-4b
  DiT head): parameters, bf16 weights, fp32 master weights + grads + AdamW states, and the activations
  saved for backward per sample, measured on one and two real-width layers and extrapolated.
- train_memory: peak resident memory (RSS) of each toy training stage (clip, understand, decoder,
  generate), each run as `python train.py --stage S --steps 5 --quiet --ckpt-every 0` into a temporary
  run folder, in pipeline order so each stage finds the checkpoints it builds on. Default toy batch sizes
  and image set: memory depends on both; only the step count is cut (20 steps peak no higher than 5).
Each benchmark prints a small table; the last line of stdout is one JSON object with every figure.

Benchmarks are plain functions registered with @benchmark("name"); they take the parsed arguments and
return a dict of figures.
"""
import argparse
import inspect
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import data
from blip3o import DiTConfig, NextDiT, flow_matching_loss
from pipeline import CheckpointError, Pipeline, count_params, load_run

ROOT = Path(__file__).resolve().parent

BENCHMARKS = {}


def benchmark(name):
    """Register fn(args) -> dict under `name` for --only and the final JSON line."""

    def register(fn):
        BENCHMARKS[name] = fn
        return fn

    return register


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# ---- FLOPs --------------------------------------------------------------------------------------------


def dit_forward_flops(cfg: DiTConfig, cond_tokens: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one NextDiT forward for one sample.

    Elementwise work (norms, RoPE, modulation) is left out, as is usual for MFU figures; a training step
    counts 3x the forward (backward = 2 matmuls per forward matmul).
    """
    D, N, L, T = cfg.hidden_size, cfg.num_tokens, cond_tokens, cfg.time_embed_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = (
        2 * T * 4 * D  # adaLN modulation
        + 2 * N * D * (D + 2 * kv)  # self-attention q, k, v
        + 2 * N * D * D + 2 * L * D * 2 * kv  # cross-attention q; k, v from the condition
        + 4 * N * N * D + 4 * N * L * D  # scores and weighted values, self and cross
        + 2 * N * D * D  # shared output projection
        + 2 * N * D * cfg.ffn_dim * 3  # SwiGLU
    )
    outside = (
        2 * L * (cfg.cond_dim * D + D * D)  # condition MLP
        + 2 * N * cfg.in_channels * D  # patch embedding
        + 2 * (256 * T + T * T + D * T)  # timestep MLP and pooled-condition projection
        + 2 * T * D + 2 * N * D * cfg.in_channels  # final layer
    )
    return cfg.num_layers * per_layer + outside


# ---- the machine's limit ------------------------------------------------------------------------------

_PEAK = {}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # bf16: the DiT steps autocast over fp32 weights


@benchmark("matmul")
def bench_matmul(args):
    """Best dense matmul FLOP/s at --dtype over a few shapes, including the DiTs' own (tokens x width x FFN)."""
    device, dtype = args.device, DTYPES[args.dtype]
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (2048, 512, 1536), (4096, 128, 512)]
    per_call = 4  # products per timed call
    if device.type == "cuda":  # a GPU needs big products to reach its peak: the 8B head's own, and 8192^3
        shapes += [(8192, 1792, 4864), (8192, 8192, 8192)]
        per_call = 20
    results = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        timed(lambda: a @ b, device)
        reps = max(3, int(2e10 // (2 * m * k * n)) // 4)  # ~ a few seconds per shape on 2 cores at most
        reps = max(reps, 10) if device.type == "cuda" else reps
        seconds = statistics.median(timed(lambda: [a @ b for _ in range(per_call)], device) / per_call
                                    for _ in range(reps))
        results[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds
    peak = max(results.values())
    _PEAK[args.dtype] = peak
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(f"matmul {args.dtype} ({where}):")
    for shape, flops in results.items():
        print(f"  {shape:>16}: {flops / 1e9:8.1f} GFLOP/s")
    print(f"  peak            : {peak / 1e9:8.1f} GFLOP/s")
    return {"dtype": args.dtype, "peak_flops": peak, "by_shape": results}


# ---- Next-DiT training step, ours vs diffusers --------------------------------------------------------


class DiffusersDiT(nn.Module):
    """diffusers' LuminaNextDiT2DModel behind NextDiT's interface, as the official BLIP3-o code runs it:
    the condition MLP first, image layout (B, C, H, W), timestep 1000 * (1 - t), output negated."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        from diffusers import LuminaNextDiT2DModel
        from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina

        self.grid = cfg.grid_size
        self.caption_projection = PixArtAlphaTextProjection(cfg.cond_dim, cfg.hidden_size, act_fn="gelu_tanh")
        self.model = LuminaNextDiT2DModel(
            sample_size=cfg.grid_size, patch_size=1, in_channels=cfg.in_channels, hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            cross_attention_dim=cfg.hidden_size, learn_sigma=False,
        )
        self.rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)  # built once, as a pipeline would

    def forward(self, x, t, cond):
        B, N, C = x.shape
        out = self.model(
            hidden_states=x.transpose(1, 2).reshape(B, C, self.grid, self.grid),
            timestep=1000 * (1 - t),
            encoder_hidden_states=self.caption_projection(cond),
            encoder_mask=torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device),  # all tokens
            image_rotary_emb=self.rope,
            cross_attention_kwargs={},
        ).sample  # (B, C, H, W)
        return -out.flatten(2).transpose(1, 2)  # (B, N, C)


def make_train_step(model, x1, cond, amp_dtype=None, fused_adamw=False):
    """One full training step: flow-matching loss, backward, AdamW (the training loop's inner body).

    amp_dtype=torch.bfloat16 runs the forward under autocast with fp32 weights, as train.py does on CUDA."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused_adamw or None)
    device_type = x1.device.type

    def step():
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, _, _ = flow_matching_loss(model, x1, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_dit_step(args, name, cfg, batch, cond_tokens, rounds):
    device = args.device
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    x1 = torch.randn(batch, cfg.num_tokens, cfg.in_channels, device=device)
    cond = torch.randn(batch, cond_tokens, cfg.cond_dim, device=device)
    with device:  # built in place: a real-size head is 5.5 GB in fp32
        models = {"ours": NextDiT(cfg)}
        if args.no_peer:
            print("  --no-peer: diffusers not run")
        else:
            try:
                models["diffusers"] = DiffusersDiT(cfg)
            except ImportError:
                print("  diffusers not importable: peer comparison skipped")
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    shapes = {k: tuple(m(x1[:2], torch.rand(2, device=device), cond[:2]).shape) for k, m in models.items()}
    steps, compile_s = {}, {}
    for k, m in models.items():
        if args.compile:  # regional: each transformer block, ours (as train.py --compile does) and theirs alike
            if k == "ours":
                m.compile_blocks()
            else:
                for block in m.model.layers:
                    block.compile()
        amp_dtype = None if args.dtype == "fp32" else DTYPES[args.dtype]
        steps[k] = make_train_step(m, x1, cond, amp_dtype=amp_dtype, fused_adamw=args.fused_adamw)
        compile_s[k] = timed(steps[k], device)  # warm-up (and compilation) step
        timed(steps[k], device)
    times = {k: [] for k in steps}
    for _ in range(rounds):  # interleaved, so both see the same machine load
        for k, step in steps.items():
            times[k].append(timed(step, device))
    flops_step = 3 * dit_forward_flops(cfg, cond_tokens) * batch
    peak = _PEAK.get(args.dtype)
    result = {"config": {**cfg.__dict__, "batch": batch, "cond_tokens": cond_tokens}, "params": params,
              "flops_per_step": flops_step, "compile": args.compile, "dtype": args.dtype,
              "fused_adamw": args.fused_adamw}
    precision = "fp32" if args.dtype == "fp32" else "bf16 autocast, fp32 weights and AdamW"
    print(f"{name}: width {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, ffn {cfg.ffn_dim}, "
          f"{cfg.num_tokens} tokens x {cfg.in_channels}, condition {cond_tokens} x {cfg.cond_dim}, batch {batch}, "
          f"{precision}{', fused AdamW' if args.fused_adamw else ''}{', compiled' if args.compile else ''}")
    print(f"  FLOPs per training step = 3 x {dit_forward_flops(cfg, cond_tokens) / 1e6:.1f} MFLOP x {batch} "
          f"= {flops_step / 1e9:.1f} GFLOP")
    for k in steps:
        sec = statistics.median(times[k])
        line = (f"  {k:>9}: {sec * 1e3:8.1f} ms/step  {batch / sec:7.1f} samples/s  {flops_step / sec / 1e9:7.1f} GFLOP/s"
                f"  params {params[k]:,}  out {shapes[k]}  first step {compile_s[k]:.1f} s")
        result[k] = {"s_per_step": sec, "samples_per_s": batch / sec, "flops_per_s": flops_step / sec,
                     "first_step_s": compile_s[k], "all_s": times[k]}
        if peak:
            result[k]["fraction_of_matmul_peak"] = flops_step / sec / peak
            line += f"  {100 * flops_step / sec / peak:.0f}% of {args.dtype} matmul peak"
        print(line)
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"  GPU memory: {result['max_memory_allocated_gib']:.1f} GiB at most (both models, if both ran)")
    if "diffusers" in steps:
        ratio = statistics.median(b / a for a, b in zip(times["ours"], times["diffusers"]))
        result["speed_ratio_ours_over_diffusers"] = ratio
        result["param_ratio"] = params["ours"] / params["diffusers"]
        print(f"  speed ours / diffusers: {ratio:.2f}x (median of {rounds} interleaved rounds)")
    return result


@benchmark("dit_toy")
def bench_dit_toy(args):
    cfg = DiTConfig(in_channels=64, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, cond_dim=128)
    return bench_dit_step(args, "dit_toy", cfg, batch=64, cond_tokens=64, rounds=args.rounds)


@benchmark("dit_mid")
def bench_dit_mid(args):
    cfg = DiTConfig(in_channels=64, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, cond_dim=512)
    return bench_dit_step(args, "dit_mid", cfg, batch=32, cond_tokens=64, rounds=max(3, args.rounds // 2))


@benchmark("dit_8b")
def bench_dit_8b(args):
    """The released blip3o-8b DiT head (1.37B parameters; condition: 64 query states of the 7B LM's width
    3584), one training step: a GPU benchmark. Its MFU is the step's model FLOPs over the measured matmul
    peak at --dtype (run it with --dtype bf16: the peak is then the bf16 one)."""
    if args.device.type != "cuda":
        print(f"dit_8b: needs a CUDA GPU (fp32 weights + AdamW of 1.37B parameters are 22 GB): skipped on "
              f"{args.device}")
        return {"skipped": f"needs a CUDA GPU, device was {args.device}"}
    cfg = DiTConfig(cond_dim=3584)  # the defaults are the released 8B head
    return bench_dit_step(args, "dit_8b", cfg, batch=args.batch_8b, cond_tokens=64, rounds=args.rounds)


# ---- text -> image sampling of a trained run -----------------------------------------------------------


def pipeline_defaults() -> dict:
    """The sampler settings Pipeline.generate_images uses when called plainly (what a user gets)."""
    params = inspect.signature(Pipeline.generate_images).parameters
    return {k: params[k].default for k in ("steps", "guidance")}


@benchmark("sampling")
def bench_sampling(args):
    """Images/s of text -> CLIP features -> pixels, and of text -> CLIP features alone, per batch size."""
    device = args.device
    try:
        pipe = load_run(args.run, device=device, need=("clip", "understand", "decoder", "generate"))
    except CheckpointError as e:  # no trained run yet: say so and go on with the other benchmarks
        print(f"sampling: skipped ({e})")
        return {"run": str(args.run), "skipped": str(e)}
    defaults = pipeline_defaults()
    reps = min(3, args.rounds)  # --rounds below 3: a quick check, not a figure to publish
    # GenEval-style prompts of the held-out split, all different, so a batch pads like a real one does.
    prompts = [data.make_scene(i, "test").prompt for i in range(max(args.sample_batches))]
    print(f"sampling: run {args.run}; CLIP features: {defaults['steps']} Euler steps, "
          f"guidance {defaults['guidance']} (conditional + unconditional in one batched pass); "
          f"pixels: one decoder pass; median of {reps}")
    result = {"run": str(args.run), "defaults": defaults, "repetitions": reps}
    for batch in args.sample_batches:
        captions = prompts[:batch]
        # Both calls use Pipeline's defaults; a fixed seed makes every repetition the same work.
        calls = {
            "text_to_clip": lambda: pipe.generate_tokens(captions, rng=torch.Generator(device).manual_seed(0)),
            "text_to_image": lambda: pipe.generate_images(captions, rng=torch.Generator(device).manual_seed(0)),
        }
        calls["text_to_image"]()  # warm-up (runs both stages): first-call allocations stay out of the figures
        times = {k: [] for k in calls}
        for _ in range(reps):  # interleaved, so both see the same machine load
            for k, call in calls.items():
                times[k].append(timed(call, device))
        row = {}
        for k, ts in times.items():
            sec = statistics.median(ts)
            row[k] = {"s_per_batch": sec, "images_per_s": batch / sec, "all_s": ts}
        result[f"batch_{batch}"] = row
        print(f"  batch {batch:>3}: text -> image {row['text_to_image']['images_per_s']:7.2f} images/s "
              f"({row['text_to_image']['s_per_batch']:.2f} s)   text -> CLIP features "
              f"{row['text_to_clip']['images_per_s']:7.2f} /s ({row['text_to_clip']['s_per_batch']:.2f} s)")
    return result


# ---- memory -------------------------------------------------------------------------------------------


def saved_activation_bytes(model, x, t, cond) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (parameters excluded)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t, cond)
    return sum(seen.values())


@benchmark("memory")
def bench_memory(args):
    result = {}
    # The real heads: parameters from a meta-device build (no memory), activations measured at full width
    # on one and two layers (B = 1, 64 tokens, 64 condition tokens, fp32), extrapolated to 24 layers.
    for preset, cond_dim in (("blip3o-8b", 3584), ("blip3o-4b", 2048)):
        cfg = DiTConfig(cond_dim=cond_dim)
        with torch.device("meta"):
            n = sum(count_params(NextDiT(cfg)))
        acts = []
        for layers in (1, 2):
            small = DiTConfig(cond_dim=cond_dim, num_layers=layers)
            with torch.device("meta"):
                model = NextDiT(small)
            model = model.to_empty(device="cpu")  # real storage, no initialization cost
            x, cond = torch.randn(1, 64, small.in_channels), torch.randn(1, 64, cond_dim)
            acts.append(saved_activation_bytes(model, x, torch.rand(1), cond))
            del model
        per_layer = acts[1] - acts[0]
        act_fp32 = acts[0] - per_layer + cfg.num_layers * per_layer
        gib = 2**30
        result[preset] = {
            "params": n, "weights_bf16_gib": 2 * n / gib, "master_fp32_plus_grads_gib": 8 * n / gib,
            "adamw_states_fp32_gib": 8 * n / gib, "activations_per_sample_fp32_mib": act_fp32 / 2**20,
            "activations_per_sample_bf16_mib_approx": act_fp32 / 2 / 2**20,
        }
        r = result[preset]
        print(f"{preset} DiT head: {n:,} params; bf16 weights {r['weights_bf16_gib']:.2f} GiB; fp32 master "
              f"weights + grads {r['master_fp32_plus_grads_gib']:.1f} GiB; AdamW states {r['adamw_states_fp32_gib']:.1f} GiB; "
              f"activations {r['activations_per_sample_fp32_mib']:.0f} MiB/sample fp32 "
              f"(~{r['activations_per_sample_bf16_mib_approx']:.0f} MiB bf16)")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process so far: {result['peak_rss_mib']:.0f} MiB")
    return result


# Peak RSS of a command, measured from a small intermediate process. Why not simply getrusage or wait4 on
# a child of this process: on Linux a child's ru_maxrss starts at the high-water mark of the memory it had
# *before* exec, and a child forked (or vforked) from this process had this process's memory, which after
# the DiT benchmarks is larger than a toy stage (`python -c pass` started from a 1.5 GiB parent reports
# 1.5 GiB). RUSAGE_CHILDREN deltas fail too: it is the largest child so far, not the latest one. So this
# tiny interpreter runs the command as its own child and reports that child's own peak from os.wait4: the
# pre-exec image is then just the tiny interpreter (~10 MiB), which every Python process holds anyway.
# (GNU `/usr/bin/time -v` works the same way, but is not on every machine.) ru_maxrss is in KiB on Linux
# and in bytes on macOS.
PEAK_RSS_WRAPPER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print("peak_rss_bytes", usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024), flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_with_peak_rss(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int | None]:
    """Run cmd (from the repository root) -> (finished process, its peak resident memory in bytes)."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *cmd], cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    peak = int(lines[-1].split()[1]) if lines and lines[-1].startswith("peak_rss_bytes") else None
    return proc, peak


# Enough to allocate everything a step needs (AdamW states appear at step 1); checked: 20 steps of the
# largest stage (understand) peak no higher than 5.
TRAIN_MEMORY_STEPS = 5


@benchmark("train_memory")
def bench_train_memory(args):
    """Peak RSS of each toy stage, trained in order into a temporary run folder (5 steps, default sizes)."""
    result = {"steps": TRAIN_MEMORY_STEPS}
    print(f"train_memory: peak resident memory of train.py --stage S --steps {TRAIN_MEMORY_STEPS} (toy batch sizes "
          f"and image set; time includes start-up and data preparation)")
    with tempfile.TemporaryDirectory(prefix="blip3o-bench-") as out:
        for stage in ("clip", "understand", "decoder", "generate"):  # each builds on the ones before
            cmd = [sys.executable, "train.py", "--stage", stage, "--out", out, "--steps", str(TRAIN_MEMORY_STEPS),
                   "--quiet", "--ckpt-every", "0", "--device", str(args.device), "--threads", str(args.threads)]
            start = time.perf_counter()
            proc, peak = run_with_peak_rss(cmd)
            seconds = time.perf_counter() - start
            if proc.returncode != 0 or peak is None:
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                result[stage] = {"error": f"exit status {proc.returncode}: {error}"}
                print(f"  {stage:>10}: failed ({result[stage]['error']}); later stages need it: stopping")
                break
            result[stage] = {"peak_rss_mib": peak / 2**20, "wall_s": seconds}
            print(f"  {stage:>10}: {peak / 2**20:7.0f} MiB peak RSS   ({seconds:.0f} s)")
    return result


# ---- main ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--compile", action="store_true", help="torch.compile each DiT block before timing")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=8,
                        help="timed interleaved rounds (dit_mid: half; sampling: at most 3)")
    parser.add_argument("--run", default="out/toy", help="trained run folder for the sampling benchmark")
    parser.add_argument("--sample-batches", default="1,16", help="comma-separated batch sizes for sampling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                        help="matmul peak dtype; bf16 also runs the DiT steps under bf16 autocast (GPU)")
    parser.add_argument("--batch-8b", type=int, default=64, help="batch of the dit_8b step (GPU)")
    parser.add_argument("--no-peer", action="store_true", help="time our Next-DiT alone (no diffusers)")
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) in the DiT steps")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    args.sample_batches = [int(b) for b in args.sample_batches.split(",") if b.strip()]
    if not args.sample_batches or min(args.sample_batches) < 1 or args.rounds < 1:
        parser.exit(2, "--sample-batches needs positive batch sizes and --rounds at least 1\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.exit(2, f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}\n")
    if any(n.startswith("dit_") for n in names) and "matmul" not in names:
        names.insert(0, "matmul")  # the DiT figures are reported as a fraction of it
    machine = {"device": str(args.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine()}
    print(f"machine: {machine}")
    results = {}
    for name in names:
        start = time.perf_counter()
        results[name] = BENCHMARKS[name](args)
        print(f"  ({name}: {time.perf_counter() - start:.0f} s)\n")
    print(json.dumps({"machine": machine, **results}, default=float))


if __name__ == "__main__":
    main()
