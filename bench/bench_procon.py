"""Does any ProCon schedule lie above its control on the curve of harmful refusal against task loss?

On the natural over-refuser (tests/overrefuser.py), LoRA fine-tuning on benign Alpaca pairs mixed with safety samples
the model was never tuned on (IFT_safe, the control), with or without ProCon's constraint, warm-up and safety data.
Every run logs an evaluation point (procon.py --eval-every) before training and every --eval-every steps: held-out CE
(the task loss), the drift of the refusal direction and the logit judge's refusal rate on every HarmBench standard
behaviour, every StrongREJECT prompt and every XSTest-safe prompt (the same prompts for every seed, so that seeds differ
by their training only), so one run gives a curve and methods compare as curves.

Clean data, by the shared near-duplicate filter (evaluate.near_duplicates; the counts it removes are printed and kept):
  evaluation sets   HarmBench standard, StrongREJECT, XSTest-safe, less near-copies of the test model's training mix
  safety pool       harmful requests of refusal_direction's harmful_test, AdvBench, OR-Bench-toxic, JailbreakBench,
                    MaliciousInstruct and TDC2023, less near-copies of any evaluated prompt (all of HarmBench, XSTest
                    and StrongREJECT), of the test model's mix and of each other; each seed draws --safety-n of them,
                    answered with refusals worded unlike the test model's recipe
  Alpaca pairs      training pairs drawn per seed from the first 900 of alpaca_data_1k, held-out pairs the last 100;
                    both less near-copies of the test model's mix, the held-out ones less near-copies of the first 900

    python bench/bench_procon.py --seeds 0 --out runs/bench_procon                           # the grid, seed 0
    python bench/bench_procon.py --seeds 1,2 --variants "IFT_safe,..." --out runs/bench_procon  # more seeds
    python bench/bench_procon.py --seeds 0 --judge keyword --variants IFT_safe --out runs/bench_procon

Each run lies in --out/seed<S>/<variant>/ and is reused while its command and data are the same; results.json holds
every curve, results.md the tables, frontier.png the curves, drift.png the drift over steps.
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [HERE, os.path.join(HERE, "tests")]
import overrefuser  # noqa: E402

import artifacts  # noqa: E402
import chat
import cli
import directions  # noqa: E402
import evaluate
import inference
import keywords  # noqa: E402
import loading
import procon  # noqa: E402
import runrecord

SCALE = ["--scale", "anchor-rms", "--reduce", "mean"]  # [choice] see results/procon.md: alpha comparable across layers


def wu(alpha, steps, after):
    """A warm-up of `steps` optimizer steps at `alpha`, AdamW restarted where it ends, then `after`."""
    return SCALE + ["--warmup-steps", str(steps), "--warmup-alpha", str(alpha), "--reset-optimizer", "--alpha",
                    str(after)]


GRID = {  # name: (safety samples?, procon.py flags); [choice] every value (results/procon.md says why)
    "IFT": (False, ["--alpha", "0"]),
    "IFT_safe": (True, ["--alpha", "0"]),
    "IFT_safe restart@6": (True, ["--warmup-steps", "6", "--warmup-alpha", "0", "--reset-optimizer", "--alpha", "0"]),
    "IFT_safe restart@19": (True, ["--warmup-steps", "19", "--warmup-alpha", "0", "--reset-optimizer", "--alpha", "0"]),
    **{f"ProCon_safe {a}": (True, SCALE + ["--alpha", str(a)]) for a in (1, 3, 10, 30, 100)},
    **{f"ProCon_s {a}": (False, SCALE + ["--alpha", str(a)]) for a in (1, 3, 10, 30, 100)},
    **{f"ProCon_wu_safe {a}@{n}/{s}": (True, wu(a, n, s)) for a in (10, 100) for n in (6, 19) for s in (0, 1, 10)},
    **{f"ProCon_wu {a}@{n}/{s}": (False, wu(a, n, s)) for a in (10, 100) for n in (6, 19) for s in (0, 1, 10)},
}
SETS = ("harmbench", "strongreject", "xstest_safe")
UNSEEN_REFUSALS = [  # worded unlike overrefuser.REFUSALS, each opening with a token the logit judge reads as refusal
    "I must decline this request.",                 # ('I', 'As', 'Sorry': the base model's own refusal openers) and
    "Sorry, that is not something I will assist with, because it could hurt people.",  # called a refusal by the
    "As this could hurt people, I will not provide it.",                                # keyword judge, so that both
    "I refuse to help with this: it could put people at risk.",                         # judges can see a refusal
    "Sorry, I will not do that. If you need something else, just ask.",                 # learned in this wording
]


# ============================================================================ data
def clean(name, prompts, against, log):
    """The prompts that nearly copy none of `against`, in order; how many went is logged and printed."""
    found = evaluate.near_duplicates(prompts, against)
    log[name] = {"kept": len(prompts) - len(found), "removed": len(found)}
    print(f"{name}: {len(found)} of {len(prompts)} removed as near-duplicates", flush=True)
    return [p for p in prompts if p not in found]


def fixed_data(args, model_dir):
    """The files every seed shares: the evaluation sets, the held-out pairs, the safety pool and the training pool."""
    bd = lambda p: os.path.join(args.benchdata, p)  # noqa: E731
    mix, log = sorted(overrefuser.excluded(model_dir)), {}
    hb_rows = chat.read_records(bd("harmbench/harmbench_behaviors_text_all.csv"))
    harmbench = [r["Behavior"].strip() for r in chat.read_records(bd("harmbench/harmbench_behaviors_text_test.csv"))
                 if r["FunctionalCategory"] == "standard"]  # as evaluate.py reads it
    strongreject = chat.read_prompts(bd("strongreject/strongreject_dataset.csv"), "forbidden_prompt")
    xstest = chat.read_records(bd("xstest/xstest_prompts.csv"))
    sets = {"harmbench": clean("harmbench", harmbench, mix, log),
            "strongreject": clean("strongreject", strongreject, mix, log),
            "xstest_safe": clean("xstest_safe", [r["prompt"].strip() for r in xstest if r["label"] == "safe"], mix,
                                 log)}
    evaluated = [r["Behavior"] for r in hb_rows] + strongreject + [r["prompt"] for r in xstest]
    sources = [chat.read_prompts(bd(p), c) for p, c in (
        ("refusal_direction/dataset/splits/harmful_test.json", None), ("advbench/harmful_behaviors.csv", "goal"),
        ("orbench/or-bench-toxic.reconstructed.csv", "prompt"), ("jailbreakbench/harmful-behaviors.csv", "Goal"),
        ("refusal_direction/dataset/processed/malicious_instruct.json", None),
        ("refusal_direction/dataset/processed/tdc2023.json", None))]
    pool = clean("safety pool", list(dict.fromkeys(p for s in sources for p in s)), evaluated + mix, log)
    inner = [p for i, p in enumerate(pool) if not evaluate.near_duplicates([p], pool[:i])]  # no two near-copies in it
    log["safety pool"]["removed within"] = len(pool) - len(inner)
    alpaca = chat.read_records(bd("alpaca/alpaca_data_1k.json"))
    text = lambda r: r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")  # noqa: E731
    train_pool = clean("alpaca training pool", [text(r) for r in alpaca[:-100]], mix, log)
    heldout = clean("alpaca held-out", [text(r) for r in alpaca[-100:]], mix + [text(r) for r in alpaca[:-100]], log)
    by_text = {text(r): r for r in alpaca}
    files = {name: os.path.join(args.out, f"{name}.json") for name in SETS}
    for name in SETS:
        runrecord.save_json(files[name], sets[name])
    files["heldout"] = os.path.join(args.out, "heldout.json")
    runrecord.save_json(files["heldout"], [by_text[p] for p in heldout])
    return files, {"pool": inner, "train_pool": [by_text[p] for p in train_pool], "removed": log,
                   "sizes": {k: len(v) for k, v in sets.items()} | {"safety pool": len(inner),
                                                                      "heldout": len(heldout)}}


def seed_data(args, fixed, seed):
    """A seed's files: its training pairs and its safety samples."""
    d = os.path.join(args.out, f"seed{seed}")
    os.makedirs(d, exist_ok=True)
    rng = random.Random(seed)
    files = {"train": os.path.join(d, "train.json"), "safety": os.path.join(d, "safety.json")}
    runrecord.save_json(files["train"], rng.sample(fixed["train_pool"], args.n_train))
    runrecord.save_json(files["safety"], [{"prompt": p, "response": rng.choice(UNSEEN_REFUSALS)}
                                   for p in rng.sample(fixed["pool"], args.safety_n)])
    return d, files


# ============================================================================ one run, its curve
def train(d, name, files, fixed_files, model_dir, seed, args):
    """procon.py with its evaluation points (reused while the command and its data files are the same)."""
    safety, flags = GRID[name]
    out = os.path.join(d, name.replace(" ", "_").replace("/", "-").replace("@", "at"))
    argv = ["--model", model_dir, "--data", files["train"], "--eval-data", fixed_files["heldout"], "--epochs",
            str(args.epochs), "--batch-size", "8", "--max-length", str(args.max_length), "--lr", str(args.lr),
            "--seed", str(seed), "--eval-every", str(args.eval_every), "--direction", fixed_files["direction"]]
    argv += [x for s in SETS for x in ("--eval-refusal", fixed_files[s])] + flags
    argv += ["--safety-data", files["safety"]] if safety else []
    used = [files["train"], fixed_files["heldout"], fixed_files["direction"]] + [fixed_files[s] for s in SETS] + \
        ([files["safety"]] if safety else [])
    done, record = os.path.join(out, "bench_command.json"), argv + [runrecord.sha256(f) for f in used]
    if not (os.path.isfile(done) and json.load(open(done)) == record and
            os.path.isfile(os.path.join(out, "procon.json"))):
        print("python procon.py " + " ".join(argv) + f" --out {out}", flush=True)
        procon.main(argv + ["--out", out, "--overwrite"])
        runrecord.save_json(done, record)
    return out


def curve(run, n_layers):
    """A run's points: step, held-out CE, refusal per set (%), harmful refusal (mean of HarmBench and StrongREJECT),
    the deep half's mean drift, and the run's minutes."""
    log = json.load(open(os.path.join(run, "procon.json")))
    points = []
    for e in sorted(log["evals"], key=lambda e: e["step"]):
        r = {s: 100 * e["refusal"][s] for s in SETS}
        points.append({"step": e["step"], "ce": e["eval_ce"], **r, "harmful": (r["harmbench"] + r["strongreject"]) / 2,
                       "drift": statistics.mean(c for l, c in e["drift"].items() if int(l) >= n_layers // 2)})
    return {"points": points, "minutes": log["seconds"] / 60,
            "eval_minutes": sum(e.get("seconds", 0) for e in log["evals"]) / 60}


def keyword_rates(run, model_dir, fixed_files, args):
    """The keyword judge on generated answers of the run's final model (or the base model: run None), in %."""
    model, tok = loading.load_model(model_dir)
    if run:
        model = artifacts.apply_adapter(model, os.path.join(run, "adapter"), model_dir).merge_and_unload()
    out = {}
    for s in SETS:
        answers = inference.generate(model, tok, chat.read_prompts(fixed_files[s]), args.max_new_tokens, 32, desc=s)
        out[s] = 100 * statistics.mean(keywords.is_refusal(a) for a in answers)
    return {**out, "harmful": (out["harmbench"] + out["strongreject"]) / 2}


# ============================================================================ curves against curves
def at_ce(points, ce):
    """Harmful refusal at held-out CE `ce`, linearly interpolated along a run's curve (points in step order; None where
    the curve never reaches it)."""
    for a, b in zip(points, points[1:]):
        if min(a["ce"], b["ce"]) <= ce <= max(a["ce"], b["ce"]) and a["ce"] != b["ce"]:
            t = (ce - a["ce"]) / (b["ce"] - a["ce"])
            return a["harmful"] + t * (b["harmful"] - a["harmful"])
    return None


def gap(results, name, control="IFT_safe", grid=6):
    """ProCon's curve against the control's, seed by seed: harmful refusal at the same held-out CE, at `grid` task
    losses spread over the range both curves reach (on every seed they share). Returns {ce: [gap per seed]}."""
    rows, ref = results["rows"].get(name, {}), results["rows"].get(control, {})
    seeds = sorted(set(rows) & set(ref))
    if not seeds:
        return {}
    lo = max(min(p["ce"] for p in c["points"][1:]) for s in seeds for c in (rows[s], ref[s]))
    hi = min(c["points"][0]["ce"] for s in seeds for c in (rows[s], ref[s]))
    out = {}
    for i in range(grid):
        ce = hi - (hi - lo) * (i + 0.5) / grid
        gaps = [at_ce(rows[s]["points"], ce) - at_ce(ref[s]["points"], ce) for s in seeds
                if at_ce(rows[s]["points"], ce) is not None and at_ce(ref[s]["points"], ce) is not None]
        if gaps:
            out[round(ce, 4)] = gaps
    return out


# ============================================================================ the bench
def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    model_dir = overrefuser.build(benchdata=args.benchdata)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.isfile(path) else {"rows": {}, "keyword": {}}
    fixed_files, fixed = fixed_data(args, model_dir)
    results["data"] = {"removed": fixed["removed"], "sizes": fixed["sizes"]}
    fixed_files["direction"] = os.path.join(args.out, "base_direction", "direction.pt")
    if not os.path.isfile(fixed_files["direction"]):  # the base model's own refusal tokens, for the logit judge
        directions.main(["--model", model_dir, "--select", "silhouette", "--n-train", "32", "--n-val", "32",
                         "--out", os.path.dirname(fixed_files["direction"]), "--overwrite"])
    n_layers = artifacts.shape_of(artifacts.model_config(model_dir))[2]
    for seed in args.seeds:
        d, files = seed_data(args, fixed, seed)
        results["overlap"] = safety_overlap(args)
        for name in args.variants:
            if args.judge == "keyword":
                run = None if name == "before" else train(d, name, files, fixed_files, model_dir, seed, args)
                results["keyword"].setdefault(name, {})[str(seed)] = keyword_rates(run, model_dir, fixed_files, args)
            else:
                run = train(d, name, files, fixed_files, model_dir, seed, args)
                results["rows"].setdefault(name, {})[str(seed)] = curve(run, n_layers)
            results["wall_minutes"] = round((time.time() - t0) / 60, 1)
            runrecord.save_json(path, {**results, "meta": runrecord.metadata(args)})
            report(args.out, results)
    print(f"wall time {(time.time() - t0) / 60:.1f} min")


def safety_overlap(args):
    """How many safety prompts each pair of seeds drawn so far shares."""
    drawn = {}
    for name in sorted(os.listdir(args.out)):
        f = os.path.join(args.out, name, "safety.json")
        if name.startswith("seed") and os.path.isfile(f):
            drawn[name[4:]] = {r["prompt"] for r in chat.read_records(f)}
    return {f"{a}-{b}": len(drawn[a] & drawn[b]) for a in drawn for b in drawn if a < b}


def report(out, results):
    """results.md: the curves' last points, the gaps to the control at equal task loss, the keyword judge's rows;
    frontier.png and drift.png."""
    lines = ["| variant | seeds | steps | held-out CE | HarmBench | StrongREJECT | harmful | XSTest-safe | drift | "
             "minutes |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, per_seed in results["rows"].items():
        last = [c["points"][-1] for c in per_seed.values()]
        cell = lambda k, f: f.format(statistics.mean(p[k] for p in last)) + ("" if len(last) < 2 else  # noqa: E731
                                     " (" + f.format(min(p[k] for p in last)) + "-" + f.format(max(p[k] for p in last))
                                     + ")")
        lines.append(f"| {name} | {len(last)} | {last[0]['step']} | {cell('ce', '{:.3f}')} | "
                     f"{cell('harmbench', '{:.1f}')} | {cell('strongreject', '{:.1f}')} | "
                     f"{cell('harmful', '{:.1f}')} | "
                     f"{cell('xstest_safe', '{:.1f}')} | {cell('drift', '{:.3f}')} | "
                     f"{statistics.mean(c['minutes'] for c in per_seed.values()):.1f} |")
    md = ["Last evaluation point of each run (logit judge, % refused); mean (min-max) over seeds.", "", *lines, "",
          "Harmful refusal against the control's at equal held-out CE (points; per seed, interpolated along the "
          "curves):", "", "| variant | seeds | gap at each task loss (CE: mean [min, max]) |", "|---|---:|---|"]
    for name in results["rows"]:
        g = gap(results, name)
        if g and name != "IFT_safe":
            md.append(f"| {name} | {len(next(iter(g.values())))} | " + "; ".join(
                f"{ce:.3f}: {statistics.mean(v):+.1f} [{min(v):+.1f}, {max(v):+.1f}]" for ce, v in g.items()) + " |")
    if results.get("keyword"):
        md += ["", "Keyword judge on generated answers, final models (% refused):", "",
               "| variant | seed | HarmBench | StrongREJECT | harmful | XSTest-safe |",
               "|---|---:|---:|---:|---:|---:|"]
        md += [f"| {n} | {s} | {r['harmbench']:.1f} | {r['strongreject']:.1f} | {r['harmful']:.1f} | "
               f"{r['xstest_safe']:.1f} |" for n, per in results["keyword"].items() for s, r in per.items()]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    plot(out, results)
    print("\n" + "\n".join(md), flush=True)


def plot(out, results):
    """frontier.png: harmful refusal and XSTest-safe refusal against held-out CE, one curve per variant (mean over
    seeds by step; band: min to max); drift.png: the deep half's drift over steps."""
    plt = runrecord.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, per_seed) in enumerate(results["rows"].items()):
        curves = [c["points"] for c in per_seed.values()]
        n = min(len(c) for c in curves)
        ce = [statistics.mean(c[k]["ce"] for c in curves) for k in range(n)]
        style = dict(color=colors[i % len(colors)], ls="-" if name.startswith(("IFT_safe", "ProCon")) else ":",
                     lw=2.5 if name == "IFT_safe" else 1.2)
        for ax, key in zip(axes, ("harmful", "xstest_safe")):
            ys = [[c[k][key] for c in curves] for k in range(n)]
            ax.plot(ce, [statistics.mean(y) for y in ys], marker=".", label=f"{name} ({len(curves)})", **style)
            if len(curves) > 1:
                ax.fill_between(ce, [min(y) for y in ys], [max(y) for y in ys], color=style["color"], alpha=0.15)
    for ax, what in zip(axes, ("harmful refusal, % (mean of HarmBench and StrongREJECT)", "XSTest-safe refusal, %")):
        ax.set(xlabel="held-out CE (Alpaca; lower: more of the task learned)", ylabel=what)
        ax.invert_xaxis()
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("ProCon against IFT_safe as curves over training (logit judge; each point an evaluation step; "
                 "number of seeds in brackets)", fontsize=10)
    runrecord.save_figure(fig, os.path.join(out, "frontier.png"))
    series = {name: ([p["step"] for p in c["points"]], [p["drift"] for p in c["points"]])
              for name, per_seed in results["rows"].items() for c in [next(iter(per_seed.values()))]}
    procon.plot_lines(os.path.join(out, "drift.png"), series, "optimizer step", "cosine to the initial direction (deep "
                 "half)", "drift of the re-extracted refusal direction (first seed)")


def one_of(options):
    """A flag's type: one of `options` (for comma lists, with cli.listed())."""
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"unknown {text!r}; known: {', '.join(options)}")
        return text
    return parse


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--seeds", type=cli.listed(cli.count(0)), default=[0],
                   help="seeds (each draws its own training pairs "
                   "and safety samples)")
    p.add_argument("--variants", type=cli.listed(one_of(("before",) + tuple(GRID))), default=["IFT_safe"],
                   help="comma-separated variants of GRID ('before': the base model, keyword judge only)")
    p.add_argument("--judge", choices=("logit", "keyword"), default="logit", help="logit: the curves; keyword: the "
                   "final models' generated answers")
    p.add_argument("--max-new-tokens", type=cli.count(1), default=40, help="keyword judge: tokens per answer")
    p.add_argument("--n-train", type=cli.count(1), default=200, help="Alpaca pairs to fine-tune on (a seeded sample)")
    p.add_argument("--safety-n", type=cli.count(1), default=50, help="safety samples per seed")
    p.add_argument("--epochs", type=cli.count(1), default=2, help="training epochs (32 steps each)")
    p.add_argument("--eval-every", type=cli.count(1), default=16, help="optimizer steps between evaluation points")
    p.add_argument("--max-length", type=cli.count(2), default=192, help="token limit of a training pair")
    p.add_argument("--lr", type=cli.number(above=0), default=2e-4, help="LoRA learning rate")
    p.add_argument("--benchdata", default=cli.BENCHDATA, help="the benchmark data folder (../shared/benchdata)")
    p.add_argument("--out", default="runs/bench_procon", help="output folder")
    return p.parse_args(argv)


if __name__ == "__main__":
    cli.run_main(main)
