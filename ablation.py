"""The paper's design study (BLIP3-o Figures 3 and 4) at toy scale, on a trained run's frozen pieces, trained
through train.py's own plans and loop and scored by eval.py; stdout ends in one JSON line.

    python ablation.py study                  # -> out/ablation/ablation.md, .png, .json
    python ablation.py study --quick --out /tmp/ablation      # the same in seconds (tiny sizes)
    python ablation.py diversity              # 8 seeds per prompt: the spread of each design's samples

Finding 1: CLIP features are a better generation target than VAE latents (same DiT, same flow loss).
Finding 2: flow matching gives diverse samples for one prompt; MSE regression gives one answer.
Finding 3: sequential training (LM frozen) keeps understanding as it was; joint training trades it off.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import time
from pathlib import Path

import torch

import data
import eval as evaluation
import pipeline
import sample
import train
from cli import (OneLineParser, UserError, add_run_options, add_sampling_options, check_numbers, comma_list,
                 metrics_main, rounded)

DESIGNS = {"mse-clip": "CLIP + MSE", "flow-clip": "CLIP + Flow", "flow-vae": "VAE + Flow"}  # Figure 3
ABLATION_HEADER = ["design", "toy GenEval", "CLIP retrieval", "diversity (CLIP)", "understanding",
                   "LM weights"]
DIVERSITY_COLUMNS = ["CLIP embedding", "tokens (unit std)", "pixels"]  # eval_diversity's spaces

# Sizes of `ablation.py study` (quick: seconds, for the tests; vae_* None: train.py's toy defaults).
ABLATION = {"default": dict(steps=400, every=100, batch=32, per_tag=8, per_prompt=2, questions=300,
                            captions=50, seeds=4, sample_steps=evaluation.REPORT["steps"], vae_steps=None,
                            vae_batch=None),
            "quick": dict(steps=2, every=1, batch=4, per_tag=1, per_prompt=1, questions=12, captions=2,
                          seeds=2, sample_steps=2, vae_steps=2, vae_batch=4)}


def mean_pairwise_distance(x: torch.Tensor, rms: bool = True) -> float:
    """x (P, S, ...): S samples of each of P prompts -> the mean distance between two samples of one prompt,
    over all pairs and prompts: rms per element (tokens, pixels), else Euclidean (orthogonal unit: 1.41)."""
    flat = x.flatten(2).double()  # (P, S, F)
    P, S, F = flat.shape
    # Pair by pair, written out: torch.cdist's matmul shortcut is not exactly 0 for equal rows.
    pairs = [(flat[:, i] - flat[:, j]).pow(2).sum(-1).sqrt() for i in range(S) for j in range(i + 1, S)]
    return float(torch.stack(pairs).mean() / (F ** 0.5 if rms else 1.0))


def eval_diversity(run, variants, prompts, seeds: int, steps: int, guidance: float, seed: int = 0,
                   device="cpu", allow_unknown_words: bool = False) -> dict:
    """Finding 2: each prompt (default: one held-out per tag) sampled with seeds seed.. by each trained
    variant -> the mean pairwise distance of its samples as CLIP embeddings, unit-std tokens and pixels."""
    prompts = prompts or [r["prompt"] for r in data.geneval_prompts("test", n_per_tag=1)]
    out = {"prompts": list(prompts), "seeds": seeds, "variants": {}, "skipped": []}
    rows, labels = [], []
    for variant in variants:
        pipe = pipeline.load_run(run, variant, device, need=("clip", "understand"))
        sample.check_known_words(pipe.tokenizer, prompts, allow_unknown_words)
        if pipe.generator is None:
            out["skipped"].append(variant)
            continue
        sample.check_pixels(pipe, run)
        images, tokens = sample.generate_grid(pipe, prompts, seeds, seed, steps, guidance, batch=len(prompts))
        emb = evaluation.image_embeddings(pipe, images.flatten(0, 1)).unflatten(0, images.shape[:2])
        scale = pipe.generator.target_scale.cpu()
        out["variants"][variant] = {"clip_embedding": mean_pairwise_distance(emb, rms=False),
                                    "tokens": mean_pairwise_distance(tokens / scale),
                                    "pixels": mean_pairwise_distance(images)}
        rows += [list(row) for row in images[:2]]
        labels += [f"{DESIGNS.get(variant, variant)}: {p}" for p in prompts[:2]]
    if not out["variants"]:
        raise UserError(f"none of {', '.join(variants)} is trained in {run} (python train.py --stage "
                        f"generate --loss flow|mse --target clip|vae --out {run})")
    flow, mse = out["variants"].get("flow-clip"), out["variants"].get("mse-clip")
    if flow and mse:  # the paper's claim in one number per space: MSE's spread relative to flow's
        out["mse_over_flow"] = {k: mse[k] / flow[k] if flow[k] > 0 else None for k in flow}
    out["picture"] = str(sample.save_png(sample.image_grid(rows, labels), Path(run) / "diversity.png"))
    return out


def train_segment(out, stage_argv: list, steps, batch, data_args: dict, device, restart: bool):
    """Train one stage in OUT up to `steps` (resuming unless `restart`) with train.py's plan and loop."""
    argv = [*stage_argv, "--out", str(out), "--images", str(data_args["images"]), "--seed",
            str(data_args["seed"]), "--ckpt-every", "0", "--quiet", "--device", str(device)]
    argv += ["--steps", str(steps)] if steps else []
    argv += ["--batch-size", str(batch)] if batch else []
    argv += ["--restart"] if restart else []
    argv += ["--noise-repeats", "1"] if "generate" in stage_argv else []  # every design: the same noise
    args = train.parse_args(argv)
    train.seed_init(args, args.stage)  # as train.main does: the new modules' initial weights
    plan = train.PLANS[args.stage](args, device)
    train.fit(plan, args, device)
    return plan.model.inner


def ablation_folder(run: Path, out: Path, sizes: dict, device) -> dict:
    """Copy RUN's finished clip, understand, decoder (and vae) checkpoints into OUT, the frozen pieces of
    every design; train a VAE in OUT if RUN has none. -> the data arguments of RUN's stage 1, for all."""
    pipeline.check_run_folder(run)
    if out.resolve() == run.resolve():
        raise UserError("--out must not be the run folder: the study trains its own generation stages")
    for stage in ("clip", "understand", "decoder", "vae"):
        src = pipeline.checkpoint_path(run / stage)
        if src is None:
            if stage == "vae":
                continue
            raise UserError(f"no {stage} checkpoint in {run} (train it: python train.py --stage {stage} "
                            f"--out {run})")
        state = pipeline.read_meta(src, stage, run / stage)["state"]
        if not state["done"]:
            raise UserError(f"{run / stage} is still training (step {state['step']}): wait until it is done")
        dst = pipeline.checkpoint_path(out / stage)
        if dst is None:
            shutil.copytree(src, out / stage, ignore=shutil.ignore_patterns("optimizer.pt"))
        elif not filecmp.cmp(src / "model.safetensors", dst / "model.safetensors", shallow=False):
            raise UserError(f"{out / stage} is not {run / stage} any more (retrained since?): use a new "
                            "--out")
    args = pipeline.read_meta(pipeline.checkpoint_path(out / "understand"), "understand").get("args", {})
    data_args = {"images": args.get("images") or train.TOY_IMAGES, "seed": args.get("seed", 0)}
    if pipeline.checkpoint_path(out / "vae") is None:
        print(f"[ablation] {run} has no VAE: training one in {out / 'vae'}", flush=True)
        train_segment(out, ["--stage", "vae"], sizes["vae_steps"], sizes["vae_batch"], data_args, device,
                      restart=True)
    return data_args


def lm_change(vlm, stage1: dict) -> tuple[bool, float]:
    """The VLM (LM + projector) against stage 1's tensors -> (all bit-identical, largest change)."""
    identical, largest = True, 0.0
    for key, now in pipeline.module_tensors("vlm", vlm).items():
        before = stage1[key].to(now.device, now.dtype)
        identical &= torch.equal(now, before)
        largest = max(largest, float((now.float() - before.float()).abs().max()))
    return identical, largest


def understanding(out, variant: str, sizes: dict, device, vlm_state: dict | None = None) -> dict:
    """Exact-match understanding of OUT's VLM for `variant`, or of the weights `vlm_state` when given."""
    pipe = pipeline.load_run(out, variant, device, need=("clip", "understand"))
    # A bf16 state (stage 2 on CUDA) copies the frozen fp32 weights the pipeline has loaded already.
    if vlm_state is not None and all(v.dtype == torch.float32 for v in vlm_state.values()):
        pipe.vlm.load_state_dict(vlm_state)
    m = evaluation.eval_understand(pipe, sizes["questions"], sizes["captions"])
    return {"accuracy": m["overall"], "caption_exact": m["caption_exact"], "questions": m["questions"]}


def run_ablation(run, out, sizes: dict, device) -> dict:
    """Train and score the three designs and joint CLIP + Flow, `every` steps at a time -> OUT/ablation.*"""
    start, run, out = time.time(), Path(run), Path(out)
    data_args = ablation_folder(run, out, sizes, device)
    stage1 = pipeline.load_checkpoint(out / "understand", stage="understand")[1]
    points = [*range(sizes["every"], sizes["steps"], sizes["every"]), sizes["steps"]]
    before = understanding(out, "flow-clip", sizes, device)
    designs, sequential_lm = {}, None
    for variant in (*DESIGNS, "joint"):
        argv = (["--stage", "joint"] if variant == "joint" else
                ["--stage", "generate", "--loss", variant.split("-")[0], "--target", variant.split("-")[1]])
        d = designs[variant] = {"name": DESIGNS.get(variant, "CLIP + Flow, joint"), "curve": [],
                                "train_seconds": 0.0, "eval_seconds": 0.0, "lm_bit_identical": True,
                                "lm_max_change": 0.0}
        for i, step in enumerate(points):
            t = time.time()
            trained = train_segment(out, argv, step, sizes["batch"], data_args, device, restart=i == 0)
            d["train_seconds"] += time.time() - t
            identical, change = lm_change(trained.vlm, stage1)  # after every segment, tensor by tensor
            d["lm_bit_identical"] &= identical
            d["lm_max_change"] = max(d["lm_max_change"], change)
            t = time.time()  # toy GenEval from pixels, and CLIP-space retrieval of the same samples
            pipe = pipeline.load_run(out, variant, device, need=("clip", "understand", "generate"))
            geneval, records, images, _ = evaluation.eval_toygeneval(
                pipe, out, variant, sizes["per_prompt"], sizes["per_tag"], sizes["sample_steps"],
                evaluation.REPORT["guidance"], quiet=True, per_position=0, per_seen=0)
            retrieval = evaluation.clipgen_scores(pipe, records, images)
            d["curve"].append({"step": step, "geneval": geneval["overall"], "retrieval": retrieval["overall"],
                               "images": geneval["images"], "geneval_per_tag": geneval["per_tag"],
                               "retrieval_per_tag": retrieval["per_tag"]})
            d["eval_seconds"] += time.time() - t
            lm = "bit-identical to stage 1" if identical else f"changed (largest change {change:.2e})"
            print(f"[ablation] {d['name']} at step {step}: toy GenEval {d['curve'][-1]['geneval']:.3f}, "
                  f"CLIP-space retrieval {d['curve'][-1]['retrieval']:.3f}; LM {lm}", flush=True)
        if variant == "flow-clip":
            sequential_lm = {k: v.detach().clone() for k, v in trained.vlm.state_dict().items()}
    und = {"before": before,
           "sequential_after": understanding(out, "flow-clip", sizes, device, sequential_lm),
           "joint_after": understanding(out, "joint", sizes, device)}
    diversity = eval_diversity(out, list(DESIGNS), None, sizes["seeds"], sizes["sample_steps"],
                               evaluation.REPORT["guidance"], device=device)
    result = {"run": str(run), "out": str(out), "sizes": sizes, "data": data_args, "points": points,
              "designs": designs, "understanding": und, "diversity": diversity}
    result["findings"] = ablation_findings(result)
    result["seconds"] = time.time() - start
    result = rounded(result)
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_ablation(result, out / "ablation.png")
    (out / "ablation.md").write_text(ablation_markdown(result))
    return result


def ablation_findings(r: dict) -> dict:
    """The paper's three findings, as the numbers measured here (whatever they say)."""
    d, und, ratio = r["designs"], r["understanding"], r["diversity"].get("mse_over_flow", {})
    clip, vae = d["flow-clip"]["curve"], d["flow-vae"]["curve"]
    before = und["before"]["accuracy"]
    f1 = {"steps": r["points"][-1],
          "clip_flow_geneval": clip[-1]["geneval"], "vae_flow_geneval": vae[-1]["geneval"],
          "clip_flow_retrieval": clip[-1]["retrieval"], "vae_flow_retrieval": vae[-1]["retrieval"],
          "clip_ahead_points": sum(c["geneval"] > v["geneval"] for c, v in zip(clip, vae)),
          "clip_behind_points": sum(c["geneval"] < v["geneval"] for c, v in zip(clip, vae)),
          "points": len(clip)}
    return {"1_clip_vs_vae": f1, "2_mse_over_flow_diversity": ratio.get("clip_embedding"),
            "2_reproduced": all(x is not None and x <= 0.1 for x in ratio.values()) if ratio else False,
            "3_sequential_lm_bit_identical": all(d[v]["lm_bit_identical"] for v in DESIGNS),
            "3_sequential_understanding_unchanged": und["sequential_after"]["accuracy"] == before,
            "3_joint_understanding_change": und["joint_after"]["accuracy"] - before,
            "3_joint_minus_sequential_geneval": d["joint"]["curve"][-1]["geneval"] - clip[-1]["geneval"]}


def ablation_rows(r: dict) -> list[list]:
    """One row of text per design: final scores, diversity, understanding after, and the LM check."""
    und, div, fmt = r["understanding"], r["diversity"]["variants"], evaluation.fmt
    rows = []
    for variant, d in r["designs"].items():
        final, change = d["curve"][-1], d["lm_max_change"]
        after = und["joint_after" if variant == "joint" else "sequential_after"]["accuracy"]
        lm = "bit-identical" if d["lm_bit_identical"] else f"changed (largest change {change:.1e})"
        rows.append([d["name"] + (" (BLIP3-o)" if variant == "flow-clip" else ""), fmt(final["geneval"]),
                     fmt(final["retrieval"]), fmt(div[variant]["clip_embedding"]) if variant in div else "-",
                     fmt(after), lm])
    return rows


def plot_ablation(r: dict, path) -> None:
    """Score vs training steps for the three designs: the paper's Figure 4 in miniature."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "geneval", "toy GenEval (held-out prompts, pixels)"),
                           (axes[1], "retrieval", "prompt retrieval in CLIP space")):
        for variant, name in DESIGNS.items():
            curve = r["designs"][variant]["curve"]
            ax.plot([p["step"] for p in curve], [p[key] for p in curve], marker="o", label=name)
        ax.set(xlabel="training steps", ylim=(0, None))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablation_markdown(r: dict) -> str:
    """OUT/ablation.md: the summary table, the curves as a table and a plot, diversity, findings."""
    s, f, und, designs = r["sizes"], r["findings"], r["understanding"], r["designs"].values()
    steps = r["points"][-1]
    md = ["# The BLIP3-o design study at toy scale", "",
          f"`python ablation.py study --run {r['run']} --out {r['out']} --steps {steps} --every "
          f"{s['every']}`: every design trained {steps} steps (batch {s['batch']}, {r['data']['images']} "
          f"training images, seed {r['data']['seed']}) from the same CLIP, stage-1 VLM and pixel decoder of "
          f"`{r['run']}`; {r['seconds'] / 60:.1f} min in all.", ""]
    md += evaluation.md_table(ABLATION_HEADER, ablation_rows(r))
    md += ["", f"Understanding (exact match, {und['before']['questions']} held-out questions) before stage "
           f"2: {und['before']['accuracy']:.3f}. Diversity: mean distance between two samples of one prompt, "
           "in toy CLIP embedding space (see below).", "",
           "## Score vs steps (Figure 4 in miniature)", "", "![score vs steps](ablation.png)", ""]
    md += evaluation.md_table(["step", *(d["name"] for d in designs)],
                              [[step, *(f"{d['curve'][i]['geneval']:.3f} / {d['curve'][i]['retrieval']:.3f}"
                                        for d in designs)] for i, step in enumerate(r["points"])])
    md += ["", "Each cell: toy GenEval / CLIP-space retrieval, "
           f"{r['designs']['flow-clip']['curve'][-1]['images']} samples ({s['per_tag']} held-out prompts per "
           f"tag at most, {s['per_prompt']} each; {s['sample_steps']} Euler steps, guidance "
           f"{evaluation.REPORT['guidance']}).", "", "## Diversity (Finding 2)", "",
           f"{r['diversity']['seeds']} seeds for each of {len(r['diversity']['prompts'])} held-out prompts; "
           "the pixel decoder is deterministic, so pixels differ only where the generated tokens do.", ""]
    md += evaluation.md_table(["design", *DIVERSITY_COLUMNS],
                              [[DESIGNS[variant], *(f"{x:.4f}" for x in v.values())]
                               for variant, v in r["diversity"]["variants"].items()])
    md += ["", "![diversity](diversity.png)", "", "## The three findings, as measured here", ""]
    f1 = f["1_clip_vs_vae"]
    md.append(f"1. CLIP vs VAE target at {f1['steps']} steps: toy GenEval {f1['clip_flow_geneval']:.3f} "
              f"(CLIP + Flow) vs {f1['vae_flow_geneval']:.3f} (VAE + Flow); CLIP-space retrieval "
              f"{f1['clip_flow_retrieval']:.3f} vs {f1['vae_flow_retrieval']:.3f}. In toy GenEval CLIP + "
              f"Flow is ahead at {f1['clip_ahead_points']} and behind at {f1['clip_behind_points']} of "
              f"{f1['points']} evaluation points (paper: CLIP ahead throughout).")
    md.append(f"2. MSE / Flow diversity in CLIP space: {evaluation.fmt(f['2_mse_over_flow_diversity'])} "
              "(paper: MSE nearly deterministic; the acceptance bound is 0.1 in every space): "
              f"{'reproduced' if f['2_reproduced'] else 'NOT reproduced'}.")
    md.append(f"3. Sequential: the LM is bit-identical to stage 1 after every training segment of all three "
              f"designs: {'yes' if f['3_sequential_lm_bit_identical'] else 'NO'}; understanding "
              f"{und['before']['accuracy']:.3f} before, {und['sequential_after']['accuracy']:.3f} after. "
              f"Joint (LM unfrozen, half of every batch understanding rows): understanding "
              f"{und['joint_after']['accuracy']:.3f} ({f['3_joint_understanding_change']:+.3f}), toy GenEval "
              f"{f['3_joint_minus_sequential_geneval']:+.3f} against sequential CLIP + Flow.")
    md += ["", "## How it was measured", "",
           "- Toy GenEval: the shapes-world detector scores the decoded pixels (the CLIP pixel decoder "
           "for CLIP targets, the VAE decoder for VAE + Flow). CLIP-space retrieval: does the CLIP embedding "
           "of a sample retrieve its own prompt among all prompts of its tag (VAE samples are decoded, then "
           "encoded by CLIP).",
           f"- Training runs in segments of {s['every']} steps (`--steps {s['every']}`, `--steps "
           f"{2 * s['every']}`, ... with train.py's resume), so each segment's cosine learning-rate schedule "
           "ends at its own last step; every design sees the same schedule, data order and noise.",
           "- Joint: `train.py --stage joint`, started from the same stage-1 checkpoint and the same initial "
           "generator as sequential CLIP + Flow, the same steps and batch size, half of each batch "
           "question-answer rows (next-token loss), half generation rows (flow loss), the sum "
           "back-propagated into LM, projector, queries and DiT; evaluated with the EMA of all of them.",
           "- Time: " + ", ".join(f"{d['name']} {d['train_seconds'] / 60:.1f} min training + "
                                   f"{d['eval_seconds'] / 60:.1f} min scoring" for d in designs) + ".", ""]
    return "\n".join(md)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help):
        return add_run_options(sub.add_parser(name, help=help, description=help))

    c = command("diversity", "spread of the samples of one prompt over seeds, per design (Finding 2)")
    c.add_argument("--variants", default=",".join(DESIGNS), help="comma-separated: flow-clip, mse-clip, "
                   "flow-vae, joint (default: the paper's three designs)")
    c.add_argument("--prompts", nargs="+", default=None, help="default: one held-out prompt per tag")
    c.add_argument("--allow-unknown-words", action="store_true", help="go on with words never seen (<unk>)")
    c.add_argument("--seeds", type=int, default=8, help="samples per prompt, seeds seed .. seed+seeds-1")
    c.add_argument("--seed", type=int, default=0, help="first seed")
    add_sampling_options(c)
    c = command("study", "the paper's design study: CLIP/VAE x MSE/Flow, sequential vs joint (Findings 1-3)")
    c.add_argument("--out", default="out/ablation", help="the study's folder (RUN's checkpoints copied in)")
    c.add_argument("--steps", metavar="N", type=int, default=None,
                   help=f"training steps per design (default {ABLATION['default']['steps']})")
    c.add_argument("--every", metavar="K", type=int, default=None,
                   help=f"evaluate every K steps (default {ABLATION['default']['every']})")
    c.add_argument("--quick", action="store_true", help="tiny sizes: a few steps, a few samples (tests)")

    args = p.parse_args(argv)
    check_numbers(p, args, at_least_one=("steps", "every"), non_negative=("guidance",))
    if args.command == "diversity":
        if args.seeds < 2:
            p.error(f"--seeds must be at least 2 (a spread needs two samples), got {args.seeds}")
        args.variants = comma_list(p, "--variants", args.variants, (*DESIGNS, "joint"))
    return args


def main(argv=None) -> int:
    return metrics_main(run_command, parse_args(argv))


def run_command(args) -> dict:
    device = pipeline.pick_device(args.device)
    if args.command == "diversity":
        m = eval_diversity(args.run, args.variants, args.prompts, args.seeds, args.steps, args.guidance,
                           args.seed, device, args.allow_unknown_words)
        print(f"Diversity: mean pairwise distance between {m['seeds']} samples of the same prompt "
              f"({len(m['prompts'])} prompts)")
        rows = [[v, DESIGNS.get(v, v), *s.values()] for v, s in m["variants"].items()]  # DIVERSITY_COLUMNS
        if "mse_over_flow" in m:
            rows.append(["mse / flow", "(paper: ~0)", *map(evaluation.fmt, m["mse_over_flow"].values())])
        print(evaluation.format_table(["variant", "design", *DIVERSITY_COLUMNS], rows))
        if m["skipped"]:
            print(f"not trained, skipped: {', '.join(m['skipped'])}")
        print(f"picture: {m['picture']}")
        return m
    sizes = dict(ABLATION["quick" if args.quick else "default"])
    sizes["steps"] = args.steps or sizes["steps"]
    sizes["every"] = min(args.every or sizes["every"], sizes["steps"])
    m = run_ablation(args.run, args.out, sizes, device)
    print(f"\nThe design study at {m['points'][-1]} steps per design (batch {sizes['batch']}, "
          f"{m['seconds'] / 60:.1f} min); understanding before stage 2: "
          f"{m['understanding']['before']['accuracy']:.3f}")
    print(evaluation.format_table(ABLATION_HEADER, ablation_rows(m)))
    print(f"files: {Path(m['out']) / 'ablation.md'}, ablation.png, ablation.json")
    return m


if __name__ == "__main__":
    sys.exit(main())
