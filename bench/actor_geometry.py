"""Why ACTOR's harmful refusal falls where it does: each test prompt's position along R_hat before training.

For one seed of bench_actor.py's protocol (its training files and its logit-judged evaluations of the base model and of
ACTOR), the last token's activation at the output of ACTOR's layer l*, projected on the initial R_hat and measured from
the benign training mean, in units of the pseudo-harmful training group's mean projection (0: benign level, 1: the
pseudo-harmful mean). Per test set: the mean position, the share of its prompts below the pseudo-harmful mean, and,
among prompts the base model refused, how many ACTOR turned to compliance, split by position.

    python bench/actor_geometry.py --run runs/bench_actor/seed0
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [HERE]
import actor as A  # noqa: E402
import chat
import cli
import inference
import loading
import runrecord


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--run", required=True, help="a seed folder of bench_actor.py (train_*.json, actor/, eval_logit_*)")
    p.add_argument("--out", default=None, help="where to write geometry.json and geometry.md (default: --run)")
    args = p.parse_args(argv)
    run, out = args.run, args.out or args.run
    meta = json.load(open(os.path.join(run, "actor", "actor.json")))
    layer = meta["layer"]
    model, tok = loading.load_model(meta["base_model"])
    # 1. r_hat and the two reference levels from the training groups, at the output of l* (capture index l* + 1)
    act = lambda prompts: inference.capture(model, tok, prompts, 1, 32)[:, layer + 1, -1]  # noqa: E731
    groups = {g: act(chat.read_prompts(os.path.join(run, f"train_{g}.json"))) for g in A.GROUPS}
    r_hat = A.unit(A.difference_in_means(groups["harmful"], groups["harmless"]))
    origin = groups["harmless"].mean(0)
    scale = ((groups["pseudo_harmful"] - origin) @ r_hat).mean()
    pos = lambda a: ((a - origin) @ r_hat / scale).tolist()  # noqa: E731
    # 2. each test prompt's position, and whether the base model and ACTOR refused it (logit judge)
    base = chat.read_records(os.path.join(run, "eval_logit_base", "responses.jsonl"))
    after = {r["id"]: r["judges"]["logit"] for r in chat.read_records(os.path.join(run, "eval_logit_actor",
                                                                                   "responses.jsonl"))}
    x = pos(act([r["prompt"] for r in base]))
    table = {}
    for name in dict.fromkeys(r["benchmark"] for r in base):
        idx = [i for i, r in enumerate(base) if r["benchmark"] == name]
        xs = [x[i] for i in idx]
        refused = [i for i in idx if base[i]["judges"]["logit"]]
        low = [i for i in refused if x[i] < 1]
        high = [i for i in refused if x[i] >= 1]
        flipped = lambda ids: sum(not after[base[i]["id"]] for i in ids)  # noqa: E731
        table[name] = {"n": len(idx), "mean_position": sum(xs) / len(xs),
                       "below_pseudo_mean": sum(v < 1 for v in xs) / len(xs),
                       "refused_below": len(low), "flipped_below": flipped(low),
                       "refused_above": len(high), "flipped_above": flipped(high)}
    for g, a in groups.items():
        table[f"{g} (training)"] = {"n": len(a), "mean_position": sum(pos(a)) / len(a),
                                    "below_pseudo_mean": sum(v < 1 for v in pos(a)) / len(a)}
    lines = [f"Position along the initial R_hat at the output of layer {layer} (0: benign training mean, 1: "
             "pseudo-harmful training mean); of the prompts the base model refused (logit judge), how many ACTOR "
             "turned to compliance, below and above the pseudo-harmful mean.\n",
             "| set | n | mean position | share below 1 | turned / refused, below 1 | turned / refused, 1 or above |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, t in table.items():
        turn = lambda k: (f"{t['flipped_' + k]} / {t['refused_' + k]} ("  # noqa: E731
                          f"{100 * t['flipped_' + k] / max(t['refused_' + k], 1):.0f}%)") if "refused_" + k in t else ""
        lines.append(f"| {name} | {t['n']} | {t['mean_position']:.2f} | {100 * t['below_pseudo_mean']:.0f}% | "
                     f"{turn('below')} | {turn('above')} |")
    md = "\n".join(lines) + "\n"
    runrecord.save_json(os.path.join(out, "geometry.json"),
                        {"layer": layer, "sets": table, "meta": runrecord.metadata(args)})
    with open(os.path.join(out, "geometry.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cli.run_main(main)
