"""ACTOR in its paper's protocol, beside the paper's baselines that run here; and the cost of one layer.

The protocol (default; Dabas et al. 2025, as the two summaries of its experiment section give it): ACTOR is trained on
pseudo-harmful queries from the training splits of the over-refusal benchmarks it reports and judged on their held-out
test splits, with OKTest, never trained on, as the out-of-distribution set. Of the paper's four benchmarks, XSTest and
OR-Bench-hard-1k are in ../shared/benchdata; SCOPE and PHTest are not (a user who has them adds them with
--extra-pseudo). Per seed, on the natural over-refuser (tests/overrefuser.py), each seed drawing its own splits:

    pseudo-harmful  --n-xstest per XSTest-safe type (stratified over its ten types) + --n-orbench OR-Bench-hard;
                    --budget N keeps a seeded N of them (the paper's query-budget ablation)
    harmful         --n-group harmful_train requests (one set; the paper's is HEx-PHI, not here)
    harmless        --n-group harmless_train requests that nearly copy nothing in the test model's training mix
    test sets       the rest of XSTest-safe; OR-Bench-hard, OKTest, AdvBench, HarmBench, StrongREJECT, XSTest-unsafe
                    and Alpaca samples of --limit prompts, none a near-copy of a training query or of the test model's
                    mix (evaluate.py --exclude, by evaluate.near_duplicates; the counts removed are kept per set)
Each training group is free of near-copies within itself, so actor_search.py's validation split is clean too.

Rows: the base model; ACTOR with actor.py's defaults (and with --renew step, the paper's renewal after each update);
ACTOR chosen by actor_search.py (its validation split drawn from the same training mix); Surgical (directions.py
--pseudo-harmful --positions post: every post-instruction position, the training prompts filtered by refusal score, the
false-refusal vector of the same queries as ACTOR, ablated, evaluate.py --ablate); SFT (procon.py --alpha 0 on the same
queries with responses: pseudo-harmful and harmless ones answered by SmolLM2 before safety tuning, which answers
everything, harmful ones refused); the uniform shift that actor_search.py chose by the same rule. Judged by the logit
judge (--judge logit: the refusal tokens directions.py found from the base model's own refusals) or the keyword judge on
generated answers. Trade-off Score: judges.tradeoff_score, (C.R. + S.S.) / 2, with C.R. the compliance on the
XSTest-safe and OR-Bench-hard test splits; S.S. the refusal on AdvBench (the paper's safety set, as the summaries name
it: the "paper-set" score) or on AdvBench, HarmBench, StrongREJECT and XSTest-unsafe (the "all-harmful" score).
XSTest-unsafe is also split into the prompts whose safe twin (same focus word) was trained on and the rest.

    python bench/bench_actor.py --seeds 0,1,2 --out runs/bench_actor                    # logit judge
    python bench/bench_actor.py --seeds 0 --judge keyword --out runs/bench_actor        # the keyword judge's rows
    python bench/bench_actor.py --transfer --seeds 0,1,2 --rows base,actor --out runs/bench_actor_transfer
    python bench/bench_actor.py --rows actor --actor-args "--origin zero" --tag zero --out runs/bench_actor
    python bench/bench_actor.py --speed --rows none     # the cost of one layer on SmolLM2 (speed ratios)

--transfer trains the pseudo-harmful group on OR-Bench-hard alone (the paper's transfer ablation). Every step reuses
what an earlier run of the same command left in --out; results.json and results.md hold every row run so far.
"""
import argparse
import json
import os
import random
import shlex
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [HERE, os.path.join(HERE, "tests")]
import overrefuser  # noqa: E402
from actor_reference import cached_epoch, uncached_epoch  # noqa: E402  (the exactness tests use them too)

import actor as A  # noqa: E402
import actor_search  # noqa: E402
import chat
import cli
import directions  # noqa: E402
import evaluate  # noqa: E402
import inference
import judges  # noqa: E402
import loading
import procon  # noqa: E402
import runrecord

ROWS = ("base", "actor", "renew", "search", "surgical", "sft", "shift")
NAMES = {"base": "base model", "actor": "ACTOR", "renew": "ACTOR, --renew step", "search": "ACTOR, actor_search.py",
         "surgical": "Surgical", "sft": "SFT", "shift": "uniform shift (searched)"}
SETS = ("xstest-safe", "orbench-hard", "oktest", "advbench", "harmbench", "strongreject", "xstest-unsafe", "alpaca")
COMPLY, PAPER_REFUSE = ("xstest-safe", "orbench-hard"), ("advbench",)
REFUSE = ("advbench", "harmbench", "strongreject", "xstest-unsafe")
TWINS = ("xstest-unsafe twin trained", "xstest-unsafe other")
COLUMNS = SETS + TWINS + ("tradeoff_paper", "tradeoff")


# ============================================================================ the protocol's data
def distinct(prompts):
    """The prompts, in order, without those that nearly copy an earlier one."""
    kept = []
    for p in prompts:
        if not evaluate.near_duplicates([p], kept):
            kept.append(p)
    return kept


def splits(seed, args, model_dir):
    """One seed's training queries (three groups, each free of near-copies within itself; the harmless ones free of
    near-copies of the test model's mix and of the Alpaca test set)."""
    rng = random.Random(seed)
    data = lambda path: os.path.join(args.benchdata, path)  # noqa: E731
    mix = sorted(overrefuser.excluded(model_dir))
    xstest = [r for r in chat.read_records(data("xstest/xstest_prompts.csv")) if r["label"] == "safe"]
    by_type = {}
    for r in xstest:
        by_type.setdefault(r["type"], []).append(r["prompt"].strip())
    pseudo = [] if args.transfer else [p for t in sorted(by_type) for p in rng.sample(by_type[t], args.n_xstest)]
    orbench = chat.read_prompts(data("orbench/or-bench-hard-1k.reconstructed.csv"))
    orbench = [p for p in orbench if p not in evaluate.near_duplicates(orbench, mix)]
    pseudo += rng.sample(orbench, args.n_orbench + (10 * args.n_xstest if args.transfer else 0))
    pseudo += chat.read_prompts(args.extra_pseudo) if args.extra_pseudo else []
    harmful = rng.sample(chat.read_prompts(data("refusal_direction/dataset/splits/harmful_train.json")), args.n_group)
    harmful += chat.read_prompts(args.extra_harmful) if args.extra_harmful else []
    pool = chat.read_prompts(data("refusal_direction/dataset/splits/harmless_train.json"))
    banned = evaluate.near_duplicates(pool, mix + chat.read_prompts(data("alpaca/alpaca_data_1k.json"), "instruction"))
    harmless = distinct(rng.sample([p for p in pool if p not in banned], 2 * args.n_group))[:args.n_group]
    return {"pseudo_harmful": distinct(pseudo), "harmful": distinct(harmful), "harmless": harmless}


def budgeted(groups, budget, seed):
    """--budget N: a seeded N of the pseudo-harmful queries (the others as they are)."""
    if not budget:
        return groups
    return {**groups, "pseudo_harmful": chat.sample(groups["pseudo_harmful"], budget, seed)}


def write_files(d, groups, model_dir):
    """The training files of a seed, and the file of prompts evaluate.py leaves out with their near-copies, each with
    the behaviour it was trained towards: every training query of the full protocol (whatever the budget) and the
    test model's mix. A test prompt is left out where it nearly copies one trained towards what its set expects; a
    contrast twin trained the other way (XSTest-unsafe's safe twins) stays in, as the test of telling them apart."""
    files = {}
    for name, prompts in groups.items():
        files[name] = os.path.join(d, f"train_{name}.json")
        runrecord.save_json(files[name], prompts)
    files["exclude"] = os.path.join(d, "exclude.json")
    mix = json.load(open(os.path.join(os.path.dirname(model_dir), "excluded.json")))
    trained = {"refuse": groups["harmful"] + mix["harmful"] + mix["orbench"],
               "comply": groups["pseudo_harmful"] + groups["harmless"] + mix["alpaca"]}
    runrecord.save_json(files["exclude"], [{"prompt": p, "expect": e} for e, ps in trained.items() for p in ps])
    return files


def sft_pairs(d, groups, files, args):
    """SFT's data: the same queries with responses. Pseudo-harmful and harmless ones are answered by SmolLM2 before
    its safety tuning (cached per seed), harmful ones refused (data/refusals.json)."""
    path = os.path.join(d, "sft_pairs.json")
    answers_path = os.path.join(os.path.dirname(d.rstrip("/")) if args.budget else d, "sft_answers.json")
    if not os.path.isfile(answers_path):
        model, tok = loading.load_model(loading.packaged_smollm2())
        answer = groups["pseudo_harmful"] + groups["harmless"]
        runrecord.save_json(answers_path, dict(zip(answer, inference.generate(model, tok, answer, args.sft_tokens, 32,
                                                                 desc="SmolLM2's own answers"))))
    answers = json.load(open(answers_path))
    refusals = chat.read_prompts(os.path.join(cli.DATA, "refusals.json"))
    rng = random.Random(0)
    pairs = [{"prompt": p, "response": answers[p]} for p in groups["pseudo_harmful"] + groups["harmless"]
             if answers[p].strip()]
    pairs += [{"prompt": p, "response": rng.choice(refusals)} for p in groups["harmful"]]
    runrecord.save_json(path, pairs)
    return path


# ============================================================================ the rows
def once(module, argv, out, marker):
    """Run a script's main(argv) into out unless out already holds `marker` from the very same settings (the flags as
    parsed, defaults included)."""
    done = os.path.join(out, "bench_command.json")
    settings = json.loads(json.dumps(vars(module.parse_args(argv)), default=str))
    if os.path.isfile(os.path.join(out, marker)) and os.path.isfile(done) and json.load(open(done)) == settings:
        return 0.0
    print(f"python {module.__name__}.py " + shlex.join(argv), flush=True)
    t = time.time()
    module.main(argv + ["--overwrite"])
    runrecord.save_json(done, settings)
    return time.time() - t


def train_rows(d, seed, model_dir, files, rows, args):
    """directions.py (refusal tokens and Surgical), actor.py, actor_search.py and procon.py's SFT, as the rows need;
    returns the seconds each took (0 where reused)."""
    q = ["--model", model_dir, "--seed", str(seed)]
    groups = ["--harmful", files["harmful"], "--pseudo-harmful", files["pseudo_harmful"], "--harmless",
              files["harmless"]]
    tag = f"_{args.tag}" if args.tag else ""
    seconds = {}
    if not args.budget:  # its refusal tokens (the logit judge) and Surgical's vector, as its authors' code makes it
        seconds["directions"] = once(directions, q + groups + [
            "--select", "silhouette", "--positions", "post", "--n-train", str(args.n_group - args.n_group // 4),
            "--n-val", str(args.n_group // 4), "--out", os.path.join(d, "directions")], os.path.join(d, "directions"),
            "false_refusal.pt")
    for row, extra in (("actor", []), ("renew", ["--renew", "step"])):
        if row in rows:
            seconds[row] = once(A, q + groups + extra + shlex.split(args.actor_args) + [
                "--out", os.path.join(d, f"{row}{tag}")], os.path.join(d, f"{row}{tag}"), "actor.json")
    if {"search", "shift"} & set(rows):
        seconds["search"] = once(actor_search, q + groups + shlex.split(args.search_args) + [
            "--out", os.path.join(d, f"search{tag}")], os.path.join(d, f"search{tag}"), "search.json")
    if "sft" in rows:
        seconds["sft"] = once(procon, q + [
            "--data", files["sft"], "--alpha", "0", "--epochs", str(args.sft_epochs), "--max-length", "192",
            "--out", os.path.join(d, "sft")], os.path.join(d, "sft"), "procon.json")
    return seconds


def evaluate_row(d, row, model_dir, files, seed, args, twins):
    """One row's refusal rates in % per set (XSTest-unsafe also split by whether its safe twin was trained on) and its
    two Trade-off Scores, evaluate.py judging what the row evaluates."""
    tag = f"_{args.tag}" if args.tag and row in ("actor", "renew", "search", "shift") else ""
    base_dir = os.path.join(os.path.dirname(d.rstrip("/")), "") if args.budget else d
    what = {"base": [], "actor": ["--patch", os.path.join(d, f"actor{tag}")],
            "renew": ["--patch", os.path.join(d, f"renew{tag}")],
            "search": ["--patch", os.path.join(d, f"search{tag}")],
            "surgical": ["--ablate", os.path.join(base_dir, "directions", "false_refusal.pt")],
            "sft": ["--adapter", os.path.join(d, "sft", "adapter")]}.get(row)
    if row == "shift":
        found = json.load(open(os.path.join(d, f"search{tag}", "search.json")))["baseline"]["chosen"]
        if found is None:
            return None
        what = ["--steer", os.path.join(d, f"search{tag}", "baseline_direction.pt"), "--coeff", f"{-found['coeff']:g}"]
    argv = ["--model", model_dir, "--data-dir", args.benchdata, "--limit", str(args.limit), "--seed", str(seed),
            "--exclude", files["exclude"], "--judge", args.judge, "--max-new-tokens", str(args.max_new_tokens)]
    argv += [x for b in ("xstest", "orbench-hard", "oktest", "advbench", "harmbench", "strongreject", "alpaca")
             for x in ("--benchmark", b)]
    if args.judge == "logit":
        argv += ["--direction", os.path.join(base_dir, "directions", "direction.pt")]
    out = os.path.join(d, f"eval_{args.judge}_{row}{tag}")
    seconds = once(evaluate, argv + what + ["--out", out], out, "summary.json")
    summary = json.load(open(os.path.join(out, "summary.json")))
    rates = {s: 100 * summary["sets"][s][args.judge]["refusal_rate"] for s in SETS}
    unsafe = [r for r in chat.read_records(os.path.join(out, "responses.jsonl")) if r["benchmark"] == "xstest-unsafe"]
    for name, keep in zip(TWINS, (True, False)):
        labels = [r["judges"][args.judge] for r in unsafe if (twins.get(r["prompt"]) is True) == keep]
        rates[name] = 100 * statistics.mean(labels) if labels else None
    rates["tradeoff_paper"] = judges.tradeoff_score([100 - rates[s] for s in COMPLY], [rates[s] for s in PAPER_REFUSE])
    rates["tradeoff"] = judges.tradeoff_score([100 - rates[s] for s in COMPLY], [rates[s] for s in REFUSE])
    return {**rates, "n": {s: summary["sets"][s][args.judge]["n"] for s in SETS},
            "excluded": summary.get("excluded_near_duplicates"), "eval_seconds": round(seconds, 1)}


def twin_map(args, groups):
    """XSTest-unsafe prompt -> whether a trained XSTest-safe prompt shares its focus word (its contrast twin)."""
    rows = chat.read_records(os.path.join(args.benchdata, "xstest/xstest_prompts.csv"))
    trained = {r["focus"].strip().lower() for r in rows if r["label"] == "safe" and
               r["prompt"].strip() in set(groups["pseudo_harmful"])}
    return {r["prompt"].strip(): r["focus"].strip().lower() in trained for r in rows if r["label"] == "unsafe"}


def protocol(args):
    model_dir = overrefuser.build(benchdata=args.benchdata)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.isfile(path) else {"rows": {}}
    t0 = time.time()
    for seed in args.seeds:
        full = splits(seed, args, model_dir)
        d = os.path.join(args.out, f"seed{seed}") + (f"/budget{args.budget}" if args.budget else "")
        os.makedirs(d, exist_ok=True)
        groups = budgeted(full, args.budget, seed)
        files = write_files(d, groups, model_dir)
        files["exclude"] = write_files(os.path.dirname(d), full, model_dir)["exclude"] if args.budget else \
            files["exclude"]  # the full protocol's, whatever the budget: the same test prompts
        files["sft"] = sft_pairs(d, groups, files, args) if "sft" in args.rows else None
        seconds = train_rows(d, seed, model_dir, files, args.rows, args)
        twins = twin_map(args, groups)
        for row in args.rows:
            rates = evaluate_row(d, row, model_dir, files, seed, args, twins)
            if rates is not None:
                label = [row] + ([args.tag] if args.tag and row in ("actor", "renew", "search", "shift") else []) + \
                    ([f"budget {args.budget}"] if args.budget else [])
                key = "/".join(label + [args.judge])
                results["rows"].setdefault(key, {})[str(seed)] = {**rates, "train_seconds": seconds,
                                                                  "n_train": {k: len(v) for k, v in groups.items()}}
        results["wall_seconds"] = {**results.get("wall_seconds", {}), " ".join(sys.argv[1:]): round(time.time() - t0)}
        runrecord.save_json(path, {**results, "meta": runrecord.metadata(args)})
        report(args.out, results)  # after every seed: a partial table is already a result
    return results


def report(out, results):
    """results.md: mean (min-max) over seeds of every row and set, XSTest-unsafe by twin, both Trade-off Scores."""
    lines = ["| row | judge | seeds | " + " | ".join(COLUMNS) + " |", "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for key, per_seed in results["rows"].items():
        row, *tag, judge = key.split("/")
        vals = list(per_seed.values())

        def cell(c):
            got = [v[c] for v in vals if v.get(c) is not None]
            if not got:
                return "-"
            return f"{statistics.mean(got):.1f}" + (f" ({min(got):.1f}-{max(got):.1f})" if len(got) > 1 else "")
        name = NAMES.get(row, row) + (f" [{', '.join(tag)}]" if tag else ", defaults" if row == "actor" else "")
        lines.append(f"| {name} | {judge} | {len(vals)} | " + " | ".join(cell(c) for c in COLUMNS) + " |")
    md = ("Refusal rate in % (mean (min-max) over seeds), held-out test splits; Trade-off Score = (C.R. + S.S.) / 2 "
          f"with C.R. over {', '.join(COMPLY)} and S.S. over {', '.join(PAPER_REFUSE)} (tradeoff_paper) or "
          f"{', '.join(REFUSE)} (tradeoff).\n\n" + "\n".join(lines) + "\n")
    md += judge_agreement(out)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print("\n" + md, flush=True)


def judge_agreement(out):
    """Where a row was judged both ways on a seed: the share of prompts on which the logit judge (first token) and the
    keyword judge (generated answer) agree."""
    lines = []
    for seed_dir in sorted(d for d in os.listdir(out) if d.startswith("seed")):
        for name in sorted(os.listdir(os.path.join(out, seed_dir))):
            kw = os.path.join(out, seed_dir, name, "responses.jsonl")
            lg = kw.replace("eval_keyword_", "eval_logit_")
            if not name.startswith("eval_keyword_") or not (os.path.isfile(kw) and os.path.isfile(lg)):
                continue
            a = {r["id"]: r["judges"]["keyword"] for r in chat.read_records(kw)}
            b = {r["id"]: r["judges"]["logit"] for r in chat.read_records(lg)}
            both = [i for i in a if i in b and a[i] is not None]
            lines.append(f"| {name[len('eval_keyword_'):]} | {seed_dir[4:]} | {len(both)} | "
                         f"{100 * sum(a[i] == b[i] for i in both) / len(both):.1f}% |")
    return "" if not lines else ("\nAgreement of the logit judge with the keyword judge on generated answers, same "
                                 "prompts:\n\n| row | seed | n | agreement |\n|---|---:|---:|---:|\n" +
                                 "\n".join(lines) + "\n")


# ============================================================================ speed: the cost of one layer
def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def sft_epoch(model, batches, opt):
    """One epoch of plain SFT: the whole model, cross-entropy on the answer tokens."""
    total = 0.0
    for enc, labels in batches:
        loss = model(**enc, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / len(batches)


def speed(args):
    """One ACTOR epoch with block l*'s inputs cached, against the same epoch through layers 0..l* at every step and one
    epoch of plain SFT on the same queries with the model's own answers (SmolLM2, the data/ query sets). Targets: at
    least 5x and 10x."""
    files = [os.path.join(cli.DATA, f) for f in ("harmful.json", "pseudo_harmful.json", "harmless.json")]
    prompts, groups = A.read_groups(dict(zip(A.GROUPS, files)), None, None, 0)
    model, tok = loading.load_model(loading.default_model())
    n_layers = loading.text_config(model).num_hidden_layers
    layer = A.silhouette_layer(model, tok, prompts, groups, list(range(n_layers // 4, 3 * n_layers // 4)), 16)[0]
    block = loading.decoder_layers(model)[layer]
    original = {k: v.clone() for k, v in block.state_dict().items()}
    t_cache, cache = timed(lambda: A.cache_block_inputs(model, tok, prompts, layer, 16))
    opt = torch.optim.AdamW(A.trainable(block, "all"), lr=1e-4)
    t_cached, loss_cached = timed(lambda: cached_epoch(block, cache, groups, opt))
    block.load_state_dict(original)
    texts = chat.format_chat(tok, prompts)
    batches = [(idx, chat.tokenize(tok, [texts[i] for i in idx], loading.model_device(model))) for idx, _, _ in cache]
    opt = torch.optim.AdamW(A.trainable(block, "all"), lr=1e-4)
    t_uncached, loss_uncached = timed(lambda: uncached_epoch(model, block, batches, groups, opt))
    block.load_state_dict(original)
    block.requires_grad_(False)
    answers = inference.generate(model, tok, prompts, 32, 32, desc="the model's own answers")
    sft_batches = []
    for idx in chat.length_batches(tok, texts, 16):
        enc = chat.tokenize(tok, [texts[i] + answers[i] + tok.eos_token for i in idx], loading.model_device(model))
        labels = enc.input_ids.clone()
        labels[enc.attention_mask == 0] = -100
        for row, i in enumerate(idx):  # no loss on the prompt (left padded: the prompt ends where the answer starts)
            n_answer = len(tok(answers[i] + tok.eos_token, add_special_tokens=False).input_ids)
            labels[row, :labels.shape[1] - n_answer] = -100
        sft_batches.append((enc, labels))
    model.requires_grad_(True)
    model.train()
    t_sft, loss_sft = timed(lambda: sft_epoch(model, sft_batches,
                                              torch.optim.AdamW([p for p in model.parameters()], lr=1e-5)))
    print(f"speed: l* = {layer}, {len(prompts)} queries, {torch.get_num_threads()} threads; one ACTOR epoch "
          f"{t_cached:.2f}s cached, {t_uncached:.2f}s through layers 0..l* ({t_uncached / t_cached:.1f}x, goal 5x), "
          f"{t_sft:.2f}s SFT ({t_sft / t_cached:.1f}x, goal 10x); the cache once {t_cache:.2f}s; losses "
          f"{loss_cached:.5f} / {loss_uncached:.5f}")
    return {"layer": layer, "seconds": {"cache_once": t_cache, "actor_cached": t_cached, "actor_uncached": t_uncached,
                                        "sft": t_sft}, "ratio_uncached": t_uncached / t_cached,
            "ratio_sft": t_sft / t_cached, "loss": {"cached": loss_cached, "uncached": loss_uncached, "sft": loss_sft}}


# ============================================================================ main
def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.speed:
        runrecord.save_json(os.path.join(args.out, "speed.json"), {**speed(args), "meta": runrecord.metadata(args)})
    if args.rows:
        protocol(args)


def one_of(options):
    """A flag's type: one of `options` (for comma lists, with cli.listed())."""
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"unknown {text!r}; known: {', '.join(options)}")
        return text
    return parse


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--seeds", type=cli.listed(cli.count(0)), default=[0], help="seeds (each draws its own splits)")
    p.add_argument("--rows", type=lambda t: [] if t == "none" else cli.listed(one_of(ROWS))(t), default=list(ROWS),
                   help=f"rows to run, comma-separated, of {', '.join(ROWS)} ('none': only --speed)")
    p.add_argument("--judge", choices=("logit", "keyword"), default="logit", help="evaluate.py's judge")
    p.add_argument("--limit", type=cli.count(1), default=128, help="prompts per test set (a seeded sample)")
    p.add_argument("--max-new-tokens", type=cli.count(1), default=48, help="keyword judge: tokens generated per answer")
    p.add_argument("--n-xstest", type=cli.count(1), default=8, help="training queries per XSTest-safe type ([choice])")
    p.add_argument("--n-orbench", type=cli.count(1), default=80, help="training queries from OR-Bench-hard ([choice])")
    p.add_argument("--n-group", type=cli.count(2), default=160,
                   help="harmful and benign training queries, each ([choice]: as many as the pseudo-harmful group)")
    p.add_argument("--extra-pseudo", default=None, help="a prompt file added to the pseudo-harmful training queries "
                   "(SCOPE or PHTest training splits, where a user has them)")
    p.add_argument("--extra-harmful", default=None, help="a prompt file added to the harmful training queries (an "
                   "ablation beyond the paper, e.g. data/contrast_harmful.json: harmful requests worded like the "
                   "pseudo-harmful ones)")
    p.add_argument("--budget", type=cli.count(1), default=None, help="the query-budget ablation: a seeded N of the "
                   "pseudo-harmful training queries (rows actor and sft; run the full protocol first, "
                   "in the same --out)")
    p.add_argument("--transfer", action="store_true", help="the transfer ablation: pseudo-harmful training queries "
                   "from OR-Bench-hard only (as many as the protocol's)")
    p.add_argument("--actor-args", default="", help="extra actor.py flags, quoted (name the rows with --tag)")
    p.add_argument("--search-args", default="", help="extra actor_search.py flags, quoted (name the rows with --tag)")
    p.add_argument("--tag", default="", help="a name for the ACTOR rows of non-default --actor-args/--search-args")
    p.add_argument("--sft-epochs", type=cli.count(1), default=3, help="SFT: epochs of procon.py --alpha 0 ([choice]: "
                   "ACTOR's 3)")
    p.add_argument("--sft-tokens", type=cli.count(1), default=64, help="SFT: tokens of SmolLM2's own answers")
    p.add_argument("--speed", action="store_true", help="also time one ACTOR epoch against its alternatives")
    p.add_argument("--benchdata", default=cli.BENCHDATA, help="the benchmark data folder (../shared/benchdata)")
    p.add_argument("--threads", type=cli.count(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="runs/bench_actor", help="output folder")
    return p.parse_args(argv)


if __name__ == "__main__":
    cli.run_main(main)
