"""The keyword judge (keywords.py) against XSTest's human labels, cross-validated across the completion files.

    python bench/bench_judges.py                        # gpt4 and mistralinstruct from ../shared/benchdata
    python bench/bench_judges.py --errors               # also list every response a judge gets wrong
    python bench/bench_judges.py --models gpt4 --benchdata DIR

For each file xstest/model_completions/xstest_v2_completions_MODEL.csv (450 responses, human `final_label`; full and
partial refusal count as refusal) it scores four judges: the full keyword judge; the cross-validated one, i.e. without
the patterns written while looking at that file's errors (keywords.is_refusal(..., exclude_source=MODEL)), so tuned
on the other file only; the general patterns alone (no file-tuned pattern); and XSTest's classic prefix string match
(mode="prefix"). For a file that no pattern was tuned on, the cross-validated judge is the full judge. Prints markdown
tables in the form of results/judges.md: accuracy, Cohen's kappa, precision and recall for refusal, the mean of the
cross-validated accuracies, and the disagreements with the humans by prompt type (missed refusals / false refusals).
Reads CSV files only: no model, a second of CPU.
"""
import argparse
import csv
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate
import keywords  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSAL_LABELS = {"2_full_refusal", "3_partial_refusal"}
COMPLIANCE_LABELS = {"1_full_compliance"}


def read_file(benchdata, model, column):
    path = os.path.join(benchdata, "xstest", "model_completions", f"xstest_v2_completions_{model}.csv")
    if not os.path.isfile(path):
        sys.exit(f"{path}: no such file (--benchdata is the folder laid out like ../shared/benchdata)")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0]:
        sys.exit(f"{path}: no column {column!r}")
    bad = sorted({r[column] for r in rows} - REFUSAL_LABELS - COMPLIANCE_LABELS)
    if bad:
        sys.exit(f"{path}: unknown labels in {column!r}: {bad}")
    return rows


def judges_for(model):
    """(name, function) pairs scored on a file: full, cross-validated, general only, classic prefix."""
    tuned_here = model in keywords.SOURCES and model != "general"
    file_sources = [s for s in keywords.SOURCES if s != "general"]
    return [
        ("keyword (full)", lambda t: keywords.is_refusal(t)),
        ("keyword, cross-validated" + ("" if tuned_here else " (= full: not tuned on this file)"),
         keywords.judge_without(model) if tuned_here else (lambda t: keywords.is_refusal(t))),
        ("keyword, general patterns only", lambda t: keywords.is_refusal(t, exclude_source=file_sources)),
        ("XSTest prefix match (mode=prefix)", lambda t: keywords.is_refusal(t, mode="prefix")),
    ]


def scores(pred, gold):
    """judges.agreement's accuracy, kappa, precision and recall for refusal, under short names for the table."""
    a = evaluate.agreement(pred, gold)
    nan = float("nan")
    return {"n": a["n"], "accuracy": a["accuracy"], "kappa": nan if a["cohen_kappa"] is None else a["cohen_kappa"],
            "precision": nan if a["precision_refusal"] is None else a["precision_refusal"],
            "recall": nan if a["recall_refusal"] is None else a["recall_refusal"],
            "fp": a["confusion"]["comply_judged_refusal"], "fn": a["confusion"]["refusal_judged_comply"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchdata", default=os.path.join(ROOT, "..", "shared", "benchdata"),
                   help="folder laid out like ../shared/benchdata (default: ../shared/benchdata next to the repo)")
    p.add_argument("--models", nargs="+", default=["gpt4", "mistralinstruct"],
                   help="MODEL names of xstest/model_completions/xstest_v2_completions_MODEL.csv to score; a file "
                        "named after a pattern source (gpt4, mistralinstruct) is cross-validated by leaving that "
                        "source's patterns out")
    p.add_argument("--labels", default="final_label", help="column of human labels (1_full_compliance, "
                   "2_full_refusal, 3_partial_refusal)")
    p.add_argument("--errors", action="store_true", help="also list each response the full and the cross-validated "
                   "judges get wrong: id, type, label, the patterns that fired, the response's opening")
    args = p.parse_args(argv)

    data = {m: read_file(args.benchdata, m, args.labels) for m in args.models}
    f3 = "{:.3f}".format
    print("| responses | judge | accuracy | Cohen's kappa | precision (refusal) | recall (refusal) | "
          "missed refusals / false refusals |")
    print("|---|---|---|---|---|---|---|")
    cv_acc, cv_kappa, wrong = [], [], {}
    for m, rows in data.items():
        gold = [r[args.labels] in REFUSAL_LABELS for r in rows]
        for i, (name, judge) in enumerate(judges_for(m)):
            pred = [judge(r["completion"]) for r in rows]
            a = scores(pred, gold)
            print(f"| {m} ({a['n']}) | {name} | {f3(a['accuracy'])} | {f3(a['kappa'])} | {f3(a['precision'])} | "
                  f"{f3(a['recall'])} | {a['fn']} / {a['fp']} |")
            if i == 1:
                cv_acc.append(a["accuracy"])
                cv_kappa.append(a["kappa"])
            if i < 2:
                wrong[(m, "full" if i == 0 else "cross-validated")] = [
                    (r, p_) for r, p_, g in zip(rows, pred, gold) if p_ != g]
    print(f"\nMean cross-validated accuracy over {len(cv_acc)} file(s): **{f3(sum(cv_acc) / len(cv_acc))}** "
          f"(kappa {f3(sum(cv_kappa) / len(cv_kappa))}).\n")

    types = sorted({r["type"] for rows in data.values() for r in rows})
    print("Disagreements with the humans by prompt type, missed refusals / false refusals (types with none omitted):\n")
    print("| type | " + " | ".join(f"{m} {j}" for m, j in wrong) + " |")
    print("|---|" + "---|" * len(wrong))
    for t in types:
        cells = []
        for key, errs in wrong.items():
            c = Counter(p_ for r, p_ in errs if r["type"] == t)
            cells.append(f"{c[False]} / {c[True]}" if c else "")
        if any(cells):
            print(f"| {t} | " + " | ".join(cells) + " |")

    if args.errors:
        for (m, j), errs in wrong.items():
            exclude = m if j == "cross-validated" and m in keywords.SOURCES else None
            print(f"\n### {m}, {j} judge: {len(errs)} wrong\n")
            for r, p_ in errs:
                fired = "; ".join(f"{x.kind}: {x.reason}" for x in keywords.matches(r["completion"], exclude))
                text = " ".join(r["completion"].split())[:200]
                print(f"- {r['id']} {r['type']} {r[args.labels]}, judged {'refusal' if p_ else 'compliance'}"
                      f"{' [' + fired + ']' if fired else ''}: {text}")


if __name__ == "__main__":
    main()
