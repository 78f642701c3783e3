"""ACTOR in its paper's protocol, beside the paper's baselines that run here; and the cost of one layer.

The protocol (default; Dabas et al. 2025, as the two summaries of its experiment section give it): ACTOR is trained on
pseudo-harmful queries from the training splits of the over-refusal benchmarks it reports and judged on their held-out
test splits, with OKTest, never trained on, as the out-of-distribution set. Of the paper's four benchmarks, XSTest and
OR-Bench-hard-1k are in ../shared/benchdata; SCOPE and PHTest are not (a user who has them adds them with
--extra-pseudo). Per seed, on the natural over-refuser (tests/overrefuser.py), each seed drawing its own splits:

    pseudo-harmful  --n-xstest per XSTest-safe type (stratified over its ten types) + --n-orbench OR-Bench-hard
    harmful         --n-group harmful_train requests (one set; the paper's is HEx-PHI, not here)
    benign          --n-group harmless_train requests that are not in the test model's training mix
    test sets       the rest of XSTest-safe; OR-Bench-hard, OKTest, HarmBench, StrongREJECT, XSTest-unsafe and Alpaca
                    samples of --limit prompts, none trained on (evaluate.py --exclude)

Rows: the base model; ACTOR with actor.py's defaults; ACTOR chosen by actor_search.py (its validation split drawn from
the same training mix); Surgical (directions.py --pseudo-harmful: the false-refusal vector of the same training queries,
ablated, evaluate.py --ablate); SFT (procon.py --alpha 0 on the same queries with responses: pseudo-harmful and benign
ones answered by SmolLM2 before safety tuning, which answers everything, harmful ones refused); the uniform shift that
actor_search.py chose by the same rule. Judged by the logit judge (--judge logit: the refusal tokens directions.py found
from the base model's own refusals) or the keyword judge on generated answers. Trade-off Score: judges.tradeoff_score,
(C.R. + S.S.) / 2, with C.R. the compliance on the XSTest-safe and OR-Bench-hard test splits and S.S. the refusal on
HarmBench, StrongREJECT and XSTest-unsafe ([choice]: the paper's sets, as far as they are here); OKTest apart.

    python bench/bench_actor.py --seeds 0,1,2 --out runs/bench_actor                    # logit judge
    python bench/bench_actor.py --seeds 0 --judge keyword --out runs/bench_actor        # the keyword judge's rows
    python bench/bench_actor.py --transfer --seeds 0,1,2 --rows base,actor --out runs/bench_actor_transfer
    python bench/bench_actor.py --rows actor --actor-args "--origin zero" --tag zero --out runs/bench_actor
    python bench/bench_actor.py --speed --rows none     # the cost of one layer on SmolLM2 (speed ratios)

--transfer trains the pseudo-harmful group on OR-Bench-hard alone (the paper's transfer ablation). Every step reuses
what an earlier run of the same command left in --out; results.json and results.md hold every row run so far.
"""
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
import actor as A  # noqa: E402
import actor_search  # noqa: E402
import directions  # noqa: E402
import evaluate  # noqa: E402
import judges  # noqa: E402
import overrefuser  # noqa: E402
import plumbing as pl  # noqa: E402
import procon  # noqa: E402
from actor_reference import cached_epoch, uncached_epoch  # noqa: E402  (the exactness tests use them too)

ROWS = ("base", "actor", "search", "surgical", "sft", "shift")
NAMES = {"base": "base model", "actor": "ACTOR", "search": "ACTOR, actor_search.py", "surgical": "Surgical",
         "sft": "SFT", "shift": "uniform shift (searched)"}
SETS = ("xstest-safe", "orbench-hard", "oktest", "harmbench", "strongreject", "xstest-unsafe", "alpaca")
COMPLY, REFUSE = ("xstest-safe", "orbench-hard"), ("harmbench", "strongreject", "xstest-unsafe")


# ============================================================================ the protocol's data
def splits(seed, args, model_dir):
    """One seed's training queries (three groups), the SFT pairs' prompts, and every prompt evaluation must leave
    out (the training queries and the test model's own training mix)."""
    rng = random.Random(seed)
    data = lambda path: os.path.join(args.benchdata, path)  # noqa: E731
    mix = overrefuser.excluded(model_dir)
    xstest = [r for r in pl.read_records(data("xstest/xstest_prompts.csv")) if r["label"] == "safe"]
    by_type = {}
    for r in xstest:
        by_type.setdefault(r["type"], []).append(r["prompt"].strip())
    pseudo = [] if args.transfer else [p for t in sorted(by_type) for p in rng.sample(by_type[t], args.n_xstest)]
    orbench = [p for p in pl.read_prompts(data("orbench/or-bench-hard-1k.reconstructed.csv")) if p not in mix]
    pseudo += rng.sample(orbench, args.n_orbench + (10 * args.n_xstest if args.transfer else 0))
    pseudo += pl.read_prompts(args.extra_pseudo) if args.extra_pseudo else []
    harmful = rng.sample(pl.read_prompts(data("refusal_direction/dataset/splits/harmful_train.json")), args.n_group)
    harmful += pl.read_prompts(args.extra_harmful) if args.extra_harmful else []
    alpaca = set(pl.read_prompts(data("alpaca/alpaca_data_1k.json"), "instruction"))
    harmless = rng.sample([p for p in pl.read_prompts(data("refusal_direction/dataset/splits/harmless_train.json"))
                           if p not in mix and p not in alpaca], args.n_group)
    return {"pseudo_harmful": pseudo, "harmful": harmful, "harmless": harmless}


def write_files(d, groups, model_dir):
    """The training files of a seed, and the file of prompts evaluate.py leaves out."""
    files = {}
    for name, prompts in groups.items():
        files[name] = os.path.join(d, f"train_{name}.json")
        pl.save_json(files[name], prompts)
    files["exclude"] = os.path.join(d, "exclude.json")
    pl.save_json(files["exclude"], sorted(overrefuser.excluded(model_dir).union(*groups.values())))
    return files


def sft_pairs(d, groups, files, args):
    """SFT's data: the same queries with responses. Pseudo-harmful and benign ones are answered by SmolLM2 before its
    safety tuning (cached per seed), harmful ones refused (data/refusals.json)."""
    path = os.path.join(d, "sft_pairs.json")
    if not os.path.isfile(path):
        model, tok = pl.load_model(pl.packaged_smollm2())
        answer = groups["pseudo_harmful"] + groups["harmless"]
        answers = pl.generate(model, tok, answer, args.sft_tokens, 32, desc="SmolLM2's own answers")
        refusals = pl.read_prompts(os.path.join(pl.DATA, "refusals.json"))
        rng = random.Random(0)
        pairs = [{"prompt": p, "response": a} for p, a in zip(answer, answers) if a.strip()]
        pairs += [{"prompt": p, "response": rng.choice(refusals)} for p in groups["harmful"]]
        pl.save_json(path, pairs)
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
    pl.save_json(done, settings)
    return time.time() - t


def train_rows(d, seed, model_dir, files, rows, args):
    """directions.py (refusal tokens and Surgical), actor.py, actor_search.py and procon.py's SFT, as the rows need;
    returns the seconds each took (0 where reused)."""
    q = ["--model", model_dir, "--seed", str(seed)]
    groups = ["--harmful", files["harmful"], "--pseudo-harmful", files["pseudo_harmful"], "--harmless", files["harmless"]]
    tag = f"_{args.tag}" if args.tag else ""
    seconds = {"directions": once(directions, q + [  # its refusal tokens (the logit judge) and Surgical's vector
        "--harmful", files["harmful"], "--harmless", files["harmless"], "--pseudo-harmful", files["pseudo_harmful"],
        "--select", "silhouette", "--out", os.path.join(d, "directions")], os.path.join(d, "directions"),
        "false_refusal.pt")}
    if "actor" in rows:
        seconds["actor"] = once(A, q + groups + shlex.split(args.actor_args) + [
            "--out", os.path.join(d, f"actor{tag}")], os.path.join(d, f"actor{tag}"), "actor.json")
    if {"search", "shift"} & set(rows):
        seconds["search"] = once(actor_search, q + groups + shlex.split(args.search_args) + [
            "--out", os.path.join(d, f"search{tag}")], os.path.join(d, f"search{tag}"), "search.json")
    if "sft" in rows:
        seconds["sft"] = once(procon, q + [
            "--data", files["sft"], "--alpha", "0", "--epochs", str(args.sft_epochs), "--max-length", "192",
            "--out", os.path.join(d, "sft")], os.path.join(d, "sft"), "procon.json")
    return seconds


def evaluate_row(d, row, model_dir, files, seed, args):
    """One row's refusal rates in % per set, evaluate.py judging what the row evaluates."""
    tag = f"_{args.tag}" if args.tag and row in ("actor", "search", "shift") else ""
    what = {"base": [], "actor": ["--patch", os.path.join(d, f"actor{tag}")],
            "search": ["--patch", os.path.join(d, f"search{tag}")],
            "surgical": ["--ablate", os.path.join(d, "directions", "false_refusal.pt")],
            "sft": ["--adapter", os.path.join(d, "sft", "adapter")]}.get(row)
    if row == "shift":
        found = json.load(open(os.path.join(d, f"search{tag}", "search.json")))["baseline"]["chosen"]
        if found is None:
            return None
        what = ["--steer", os.path.join(d, f"search{tag}", "baseline_direction.pt"), "--coeff", f"{-found['coeff']:g}"]
    argv = ["--model", model_dir, "--data-dir", args.benchdata, "--limit", str(args.limit), "--seed", str(seed),
            "--exclude", files["exclude"], "--judge", args.judge, "--max-new-tokens", str(args.max_new_tokens)]
    argv += [x for b in ("xstest", "orbench-hard", "oktest", "harmbench", "strongreject", "alpaca")
             for x in ("--benchmark", b)]
    if args.judge == "logit":
        argv += ["--direction", os.path.join(d, "directions", "direction.pt")]
    out = os.path.join(d, f"eval_{args.judge}_{row}{tag}")
    seconds = once(evaluate, argv + what + ["--out", out], out, "summary.json")
    sets = json.load(open(os.path.join(out, "summary.json")))["sets"]
    rates = {s: 100 * sets[s][args.judge]["refusal_rate"] for s in SETS}
    rates["tradeoff"] = judges.tradeoff_score([100 - rates[s] for s in COMPLY], [rates[s] for s in REFUSE])
    return {**rates, "eval_seconds": round(seconds, 1)}


def protocol(args):
    model_dir = overrefuser.build(benchdata=args.benchdata)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.isfile(path) else {"rows": {}}
    t0 = time.time()
    for seed in args.seeds:
        d = os.path.join(args.out, f"seed{seed}")
        os.makedirs(d, exist_ok=True)
        groups = splits(seed, args, model_dir)
        files = write_files(d, groups, model_dir)
        files["sft"] = sft_pairs(d, groups, files, args) if "sft" in args.rows else None
        seconds = train_rows(d, seed, model_dir, files, args.rows, args)
        for row in args.rows:
            rates = evaluate_row(d, row, model_dir, files, seed, args)
            if rates is not None:
                key = f"{row}{'/' + args.tag if args.tag and row in ('actor', 'search', 'shift') else ''}/{args.judge}"
                results["rows"].setdefault(key, {})[str(seed)] = {**rates, "train_seconds": seconds}
        results["wall_seconds"] = {**results.get("wall_seconds", {}), " ".join(sys.argv[1:]): round(time.time() - t0)}
        pl.save_json(path, {**results, "meta": pl.metadata(args)})
        report(args.out, results)  # after every seed: a partial table is already a result
    return results


def report(out, results):
    """results.md: mean (min-max) over seeds of every row and set, and the Trade-off Score."""
    cols = list(SETS) + ["tradeoff"]
    lines = ["| row | judge | seeds | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    for key, per_seed in results["rows"].items():
        row, *tag, judge = key.split("/")
        vals = list(per_seed.values())
        cell = lambda c: f"{statistics.mean(v[c] for v in vals):.1f} ({min(v[c] for v in vals):.1f}-" \
                         f"{max(v[c] for v in vals):.1f})" if len(vals) > 1 else f"{vals[0][c]:.1f}"  # noqa: E731
        name = NAMES.get(row, row) + (f" [{tag[0]}]" if tag else ", defaults" if row == "actor" else "")
        lines.append(f"| {name} | {judge} | {len(vals)} | " + " | ".join(cell(c) for c in cols) + " |")
    md = ("Refusal rate in % (mean (min-max) over seeds), held-out test splits; Trade-off Score = (C.R. + S.S.) / 2 "
          f"with C.R. over {', '.join(COMPLY)} and S.S. over {', '.join(REFUSE)}.\n\n" + "\n".join(lines) + "\n")
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
            a = {r["id"]: r["judges"]["keyword"] for r in pl.read_records(kw)}
            b = {r["id"]: r["judges"]["logit"] for r in pl.read_records(lg)}
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
    files = [os.path.join(pl.DATA, f) for f in ("harmful.json", "pseudo_harmful.json", "harmless.json")]
    prompts, groups = A.read_groups(dict(zip(A.GROUPS, files)), None, None, 0)
    model, tok = pl.load_model(pl.default_model())
    n_layers = pl.text_config(model).num_hidden_layers
    layer = A.choose_layer(model, tok, prompts, groups, list(range(n_layers // 4, 3 * n_layers // 4)), 16)[0]
    block = pl.decoder_layers(model)[layer]
    original = {k: v.clone() for k, v in block.state_dict().items()}
    t_cache, cache = timed(lambda: A.cache_block_inputs(model, tok, prompts, layer, 16))
    opt = torch.optim.AdamW(A.trainable(block, "all"), lr=1e-4)
    t_cached, loss_cached = timed(lambda: cached_epoch(block, cache, groups, opt))
    block.load_state_dict(original)
    texts = pl.format_chat(tok, prompts)
    batches = [(idx, pl.tokenize(tok, [texts[i] for i in idx], pl.model_device(model))) for idx, _, _ in cache]
    opt = torch.optim.AdamW(A.trainable(block, "all"), lr=1e-4)
    t_uncached, loss_uncached = timed(lambda: uncached_epoch(model, block, batches, groups, opt))
    block.load_state_dict(original)
    block.requires_grad_(False)
    answers = pl.generate(model, tok, prompts, 32, 32, desc="the model's own answers")
    sft_batches = []
    for idx in pl.length_batches(tok, texts, 16):
        enc = pl.tokenize(tok, [texts[i] + answers[i] + tok.eos_token for i in idx], pl.model_device(model))
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
        pl.save_json(os.path.join(args.out, "speed.json"), {**speed(args), "meta": pl.metadata(args)})
    if args.rows:
        protocol(args)


def parse_args(argv=None):
    p = pl.parser(__doc__)
    p.add_argument("--seeds", type=pl.listed(pl.count(0)), default=[0], help="seeds (each draws its own splits)")
    p.add_argument("--rows", type=lambda t: [] if t == "none" else pl.listed(pl.one_of(ROWS))(t), default=list(ROWS),
                   help=f"rows to run, comma-separated, of {', '.join(ROWS)} ('none': only --speed)")
    p.add_argument("--judge", choices=("logit", "keyword"), default="logit", help="evaluate.py's judge")
    p.add_argument("--limit", type=pl.count(1), default=128, help="prompts per test set (a seeded sample)")
    p.add_argument("--max-new-tokens", type=pl.count(1), default=48, help="keyword judge: tokens generated per answer")
    p.add_argument("--n-xstest", type=pl.count(1), default=8, help="training queries per XSTest-safe type ([choice])")
    p.add_argument("--n-orbench", type=pl.count(1), default=80, help="training queries from OR-Bench-hard ([choice])")
    p.add_argument("--n-group", type=pl.count(2), default=160,
                   help="harmful and benign training queries, each ([choice]: as many as the pseudo-harmful group)")
    p.add_argument("--extra-pseudo", default=None, help="a prompt file added to the pseudo-harmful training queries "
                   "(SCOPE or PHTest training splits, where a user has them)")
    p.add_argument("--extra-harmful", default=None, help="a prompt file added to the harmful training queries (an "
                   "ablation beyond the paper, e.g. data/contrast_harmful.json: harmful requests worded like the "
                   "pseudo-harmful ones)")
    p.add_argument("--transfer", action="store_true", help="the transfer ablation: pseudo-harmful training queries "
                   "from OR-Bench-hard only (as many as the protocol's)")
    p.add_argument("--actor-args", default="", help="extra actor.py flags, quoted (name the rows with --tag)")
    p.add_argument("--search-args", default="", help="extra actor_search.py flags, quoted (name the rows with --tag)")
    p.add_argument("--tag", default="", help="a name for the ACTOR rows of non-default --actor-args/--search-args")
    p.add_argument("--sft-epochs", type=pl.count(1), default=3, help="SFT: epochs of procon.py --alpha 0 ([choice]: "
                   "ACTOR's 3)")
    p.add_argument("--sft-tokens", type=pl.count(1), default=64, help="SFT: tokens of SmolLM2's own answers")
    p.add_argument("--speed", action="store_true", help="also time one ACTOR epoch against its alternatives")
    p.add_argument("--benchdata", default=pl.BENCHDATA, help="the benchmark data folder (../shared/benchdata)")
    p.add_argument("--threads", type=pl.count(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="runs/bench_actor", help="output folder")
    return p.parse_args(argv)


if __name__ == "__main__":
    pl.run_main(main)
