"""Speed and memory of blip3o: the Next-DiT against diffusers and the machine, sampling, memory.

    python bench.py                                # everything (minutes on a laptop CPU)
    python bench.py --only matmul,dit_toy          # a subset (names: see --help)
    python bench.py --only sampling --run out/toy  # text -> image speed of a trained run
    python bench.py --threads 1 --compile          # pinned threads; each DiT block torch.compiled
    python bench.py --device cuda --dtype bf16 --only dit_8b --batch-8b 128 --no-peer --fused-adamw

The benchmarks, in the order they run (each prints a table; stdout ends in one JSON line of every figure):
- matmul: the dense matmul FLOP/s torch reaches here at --dtype, the machine's practical limit.
- dit_toy, dit_mid, dit_8b (CUDA only): one Next-DiT training step at the toy size, a mid size and the
  released blip3o-8b head's, against diffusers' LuminaNextDiT2DModel's (interleaved; --no-peer: ours
  alone): samples/s, FLOP/s and their share of the matmul peak (with --dtype bf16 on a GPU, the MFU).
- sampling: text -> image and text -> CLIP features of a trained run (--run), images/s per batch size.
- memory: this process's peak RSS; parameters, weights, AdamW states and activations of the real heads.
- stages: each toy stage's start-up and step, split into data, forward, backward and optimizer.
"""
import argparse
import contextlib
import json
import platform
import resource
import statistics
import tempfile
import time

import torch
import torch.nn as nn

import data
from blip3o import GUIDANCE, SAMPLE_STEPS, DiTConfig, NextDiT, flow_matching_loss
from pipeline import CheckpointError, count_params, load_run


def timed(fn, device) -> float:
    """Seconds of one fn() call; on a GPU, from an idle queue to a drained one."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# ---- FLOPs --------------------------------------------------------------------------------------------

def dit_forward_flops(cfg: DiTConfig, cond_tokens: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one NextDiT forward for one sample. Elementwise work (norms,
    RoPE, modulation) is left out, as is usual for MFU figures; a training step counts 3x the forward."""
    D, N, L, T = cfg.hidden_size, cfg.num_tokens, cond_tokens, cfg.time_embed_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = (2 * T * 4 * D  # adaLN modulation
                 + 2 * N * D * (D + 2 * kv)  # self-attention q, k, v
                 + 2 * N * D * D + 2 * L * D * 2 * kv  # cross-attention q; k, v from the condition
                 + 4 * N * N * D + 4 * N * L * D  # scores and weighted values, self and cross
                 + 2 * N * D * D  # shared output projection
                 + 2 * N * D * cfg.ffn_dim * 3)  # SwiGLU
    outside = (2 * L * (cfg.cond_dim * D + D * D)  # condition MLP
               + 2 * N * cfg.in_channels * D  # patch embedding
               + 2 * (256 * T + T * T + D * T)  # timestep MLP and pooled-condition projection
               + 2 * T * D + 2 * N * D * cfg.in_channels)  # final layer
    return cfg.num_layers * per_layer + outside


# ---- the machine's limit ------------------------------------------------------------------------------

_PEAK = {}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # bf16: the DiT steps autocast over fp32 weights


def bench_matmul(args):
    """Best matmul FLOP/s at --dtype over a few shapes, among them the DiTs' own (tokens x width x FFN)."""
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
        # ~ a few seconds per shape on 2 cores at most
        reps = max(10 if device.type == "cuda" else 3, int(2e10 // (2 * m * k * n)) // 4)
        seconds = statistics.median(timed(lambda: [a @ b for _ in range(per_call)], device) / per_call
                                    for _ in range(reps))
        results[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds
    peak = _PEAK[args.dtype] = max(results.values())
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
            cross_attention_dim=cfg.hidden_size, learn_sigma=False)
        self.rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)  # built once, as a pipeline would

    def forward(self, x, t, cond):
        B, N, C = x.shape
        out = self.model(
            hidden_states=x.transpose(1, 2).reshape(B, C, self.grid, self.grid), timestep=1000 * (1 - t),
            encoder_hidden_states=self.caption_projection(cond),
            encoder_mask=torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device),  # all tokens
            image_rotary_emb=self.rope, cross_attention_kwargs={}).sample  # (B, C, H, W)
        return -out.flatten(2).transpose(1, 2)  # (B, N, C)


def make_train_step(model, x1, cond, dtype, fused_adamw=False):
    """A training step (flow-matching loss, backward, AdamW); bf16 autocasts over fp32 weights (train.py)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused_adamw or None)

    def step():
        with torch.autocast(x1.device.type, dtype=dtype, enabled=dtype != torch.float32):
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
    with device:  # built in place: a real-size head is gigabytes in fp32
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
        if args.compile and k == "ours":  # regional: each transformer block, as train.py --compile does
            m.compile_blocks()
        elif args.compile:  # theirs alike
            for block in m.model.layers:
                block.compile()
        steps[k] = make_train_step(m, x1, cond, DTYPES[args.dtype], fused_adamw=args.fused_adamw)
        compile_s[k] = timed(steps[k], device)  # warm-up (and compilation) step
        timed(steps[k], device)
    times = {k: [] for k in steps}
    for _ in range(rounds):  # interleaved, so both see the same machine load
        for k, step in steps.items():
            times[k].append(timed(step, device))
    flops_step, peak = 3 * dit_forward_flops(cfg, cond_tokens) * batch, _PEAK.get(args.dtype)
    result = {"config": {**cfg.__dict__, "batch": batch, "cond_tokens": cond_tokens}, "params": params,
              "flops_per_step": flops_step, "compile": args.compile, "dtype": args.dtype,
              "fused_adamw": args.fused_adamw}
    precision = "fp32" if args.dtype == "fp32" else "bf16 autocast, fp32 weights and AdamW"
    print(f"{name}: width {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, ffn "
          f"{cfg.ffn_dim}, {cfg.num_tokens} tokens x {cfg.in_channels}, condition {cond_tokens} x "
          f"{cfg.cond_dim}, batch {batch}, {precision}{', fused AdamW' if args.fused_adamw else ''}"
          f"{', compiled' if args.compile else ''}")
    print(f"  FLOPs per training step = 3 x {dit_forward_flops(cfg, cond_tokens) / 1e6:.1f} MFLOP x {batch} "
          f"= {flops_step / 1e9:.1f} GFLOP")
    for k in steps:
        sec = statistics.median(times[k])
        line = (f"  {k:>9}: {sec * 1e3:8.1f} ms/step  {batch / sec:7.1f} samples/s  "
                f"{flops_step / sec / 1e9:7.1f} GFLOP/s  params {params[k]:,}  out {shapes[k]}  "
                f"first step {compile_s[k]:.1f} s")
        result[k] = {"s_per_step": sec, "samples_per_s": batch / sec, "flops_per_s": flops_step / sec,
                     "first_step_s": compile_s[k], "all_s": times[k]}
        if peak:
            result[k]["fraction_of_matmul_peak"] = flops_step / sec / peak
            line += f"  {100 * flops_step / sec / peak:.0f}% of {args.dtype} matmul peak"
        print(line)
    if device.type == "cuda":
        gib = result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"  GPU memory: {gib:.1f} GiB at most (both models, if both ran)")
    if "diffusers" in steps:
        ratio = statistics.median(b / a for a, b in zip(times["ours"], times["diffusers"]))
        result["speed_ratio_ours_over_diffusers"] = ratio
        result["param_ratio"] = params["ours"] / params["diffusers"]
        print(f"  speed ours / diffusers: {ratio:.2f}x (median of {rounds} interleaved rounds)")
    return result


def bench_dit_toy(args):
    cfg = DiTConfig(in_channels=64, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, cond_dim=128)
    return bench_dit_step(args, "dit_toy", cfg, batch=64, cond_tokens=64, rounds=args.rounds)


def bench_dit_mid(args):
    cfg = DiTConfig(in_channels=64, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, cond_dim=512)
    return bench_dit_step(args, "dit_mid", cfg, batch=32, cond_tokens=64, rounds=max(3, args.rounds // 2))


def bench_dit_8b(args):
    if args.device.type != "cuda":
        print(f"dit_8b: needs a CUDA GPU (fp32 weights + AdamW of 1.37B parameters are 22 GB): skipped on "
              f"{args.device}")
        return {"skipped": f"needs a CUDA GPU, device was {args.device}"}
    cfg = DiTConfig(cond_dim=3584)  # the defaults are the released 8B head; its condition: 64 LM states
    return bench_dit_step(args, "dit_8b", cfg, batch=args.batch_8b, cond_tokens=64, rounds=args.rounds)


# ---- text -> image sampling of a trained run -----------------------------------------------------------

def bench_sampling(args):
    device = args.device
    try:
        pipe = load_run(args.run, device=device, need=("clip", "understand", "decoder", "generate"))
    except CheckpointError as e:  # no trained run yet: say so and go on with the other benchmarks
        print(f"sampling: skipped ({e})")
        return {"run": str(args.run), "skipped": str(e)}
    defaults = {"steps": SAMPLE_STEPS, "guidance": GUIDANCE}  # what sample.py uses unless told otherwise
    reps = min(3, args.rounds)  # --rounds below 3: a quick check, not a figure to publish
    # GenEval-style prompts of the held-out split, all different, so a batch pads like a real one does.
    prompts = [data.make_scene(i, "test").prompt for i in range(max(args.sample_batches))]
    print(f"sampling: run {args.run}; CLIP features: {defaults['steps']} Euler steps, "
          f"guidance {defaults['guidance']} (conditional + unconditional in one batched pass); "
          f"pixels: one decoder pass; median of {reps}")
    result = {"run": str(args.run), "defaults": defaults, "repetitions": reps}
    for batch in args.sample_batches:
        captions = prompts[:batch]

        def call(generate):  # a fixed seed makes every repetition the same work
            return lambda: generate(captions, **defaults, rng=torch.Generator(device).manual_seed(0))

        calls = {"text_to_clip": call(pipe.generate_tokens), "text_to_image": call(pipe.generate_images)}
        calls["text_to_image"]()  # warm-up (runs both stages): first-call allocations stay out of the figures
        times = {k: [] for k in calls}
        for _ in range(reps):  # interleaved, so both see the same machine load
            for k, call in calls.items():
                times[k].append(timed(call, device))
        sec = {k: statistics.median(ts) for k, ts in times.items()}
        row = {k: {"s_per_batch": s, "images_per_s": batch / s, "all_s": times[k]} for k, s in sec.items()}
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
                model = NextDiT(small).to_empty(device="cpu")  # real storage, no initialization cost
            x, cond = torch.randn(1, 64, small.in_channels), torch.randn(1, 64, cond_dim)
            acts.append(saved_activation_bytes(model, x, torch.rand(1), cond))
            del model
        per_layer = acts[1] - acts[0]
        act_fp32 = acts[0] - per_layer + cfg.num_layers * per_layer
        gib = 2**30
        result[preset] = {
            "params": n, "weights_bf16_gib": 2 * n / gib, "master_fp32_plus_grads_gib": 8 * n / gib,
            "adamw_states_fp32_gib": 8 * n / gib, "activations_per_sample_fp32_mib": act_fp32 / 2**20,
            "activations_per_sample_bf16_mib_approx": act_fp32 / 2 / 2**20}
        print(f"{preset} DiT head: {n:,} params; bf16 weights {2 * n / gib:.2f} GiB; fp32 master weights + "
              f"grads {8 * n / gib:.1f} GiB; AdamW states {8 * n / gib:.1f} GiB; activations "
              f"{act_fp32 / 2**20:.0f} MiB/sample fp32 (~{act_fp32 / 2 / 2**20:.0f} MiB bf16)")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process so far: {result['peak_rss_mib']:.0f} MiB")
    return result


STAGE_STEPS = 6  # timed steps per stage (after one warm-up step); the stage's own batch and data


def bench_stages(args):
    """The phases of a step timed apart; FLOPs by FlopCounterMode; the stages before each train 2 steps."""
    import train
    from torch.utils.flop_counter import FlopCounterMode

    result, phases = {}, ("data", "forward", "backward", "optimizer")
    print(f"stages: median of {STAGE_STEPS} steps per phase, in ms (the recipe's steps x batch; CPU)")
    with tempfile.TemporaryDirectory(prefix="blip3o-bench-") as out:
        for stage in train.PIPELINE:
            targs = train.parse_args(["--stage", stage, "--out", out, "--quiet", "--ckpt-every", "0"])
            start = time.perf_counter()
            plan = train.PLANS[stage](targs, args.device)
            startup = time.perf_counter() - start
            model = plan.model.to(args.device).train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = train.make_optimizer(params, plan.lr, 0.0, args.device)
            times, flops = {k: [] for k in phases}, 0
            for step in range(STAGE_STEPS + 1):
                rng = torch.Generator().manual_seed(step)
                t0 = time.perf_counter()
                batch = plan.chunk_fn(step, 0, plan.batch, rng)
                t1 = time.perf_counter()
                with FlopCounterMode(display=False) if step == 0 else contextlib.nullcontext() as counter:
                    loss, _ = model(*batch, rng=rng)
                    t2 = time.perf_counter()
                    loss.backward()
                t3 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                t4 = time.perf_counter()
                if step == 0:
                    flops = counter.get_total_flops()
                    continue
                for k, a, b in zip(phases, (t0, t1, t2, t3), (t1, t2, t3, t4)):
                    times[k].append(b - a)
            med = {k: statistics.median(v) for k, v in times.items()}
            total = sum(med.values())
            peak = _PEAK.get("fp32")
            rate = flops / (med["forward"] + med["backward"])
            result[stage] = {"startup_s": startup, "steps": plan.steps, "batch": plan.batch, "step_s": total,
                             "phases_s": med, "flops_fwd_bwd": flops, "flops_per_s": rate,
                             "projected_stage_s": startup + plan.steps * total,
                             "peak_rss_mib_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            share = f", {100 * rate / peak:.0f}% of peak" if peak else ""
            print(f"  {stage:>10}: start-up {startup:5.1f} s | step {1e3 * total:6.1f} ms = "
                  + " + ".join(f"{k} {1e3 * v:.1f}" for k, v in med.items())
                  + f" | fwd+bwd {flops / 1e9:.2f} GFLOP at {rate / 1e9:.1f} GFLOP/s{share}"
                  + f" | x {plan.steps} steps ~ {result[stage]['projected_stage_s']:.0f} s"
                  + f" | peak RSS so far {result[stage]['peak_rss_mib_so_far']:.0f} MiB")
            train.main(["--stage", stage, "--out", out, "--steps", "2", "--quiet", "--ckpt-every", "0"])
    return result


# Every benchmark: fn(args) -> dict of figures, run in this order (--only picks some).
BENCHMARKS = {"matmul": bench_matmul, "dit_toy": bench_dit_toy, "dit_mid": bench_dit_mid,
              "dit_8b": bench_dit_8b, "sampling": bench_sampling, "memory": bench_memory,
              "stages": bench_stages}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block before timing")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default; 1 is often faster on a busy CPU)")
    p.add_argument("--rounds", type=int, default=8,
                   help="timed interleaved rounds (dit_mid: half; sampling: at most 3)")
    p.add_argument("--run", default="out/toy", help="trained run folder for the sampling benchmark")
    p.add_argument("--sample-batches", default="1,16", help="comma-separated batch sizes for sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=torch.device)
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                   help="matmul peak dtype; bf16 also runs the DiT steps under bf16 autocast (GPU)")
    p.add_argument("--batch-8b", type=int, default=64, help="batch of the dit_8b step (GPU)")
    p.add_argument("--no-peer", action="store_true", help="time our Next-DiT alone (no diffusers)")
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) in the DiT steps")
    args = p.parse_args()
    args.sample_batches = [int(b) for b in args.sample_batches.split(",") if b.strip()]
    if not args.sample_batches or min(args.sample_batches) < 1 or args.rounds < 1:
        p.exit(2, "--sample-batches needs positive batch sizes and --rounds at least 1\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    if unknown := [n for n in names if n not in BENCHMARKS]:
        p.exit(2, f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}\n")
    if any(n.startswith("dit_") or n == "stages" for n in names) and "matmul" not in names:
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
