"""evaluate.py: benchmarks, generation, judges (measured against human labels), metrics, resume, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import actor as A
import directions
import keywords
import plumbing as pl
import evaluate as E
from conftest import ROOT


def summary_metrics(out):
    s = json.loads((out / "summary.json").read_text())
    return {"sets": s["sets"], "overall": s["overall"], "tradeoff": s["tradeoff"]}


def rows_of(out):
    return [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]


def run_eval(model, out, *extra):
    E.main(["--model", model, "--out", str(out), "--max-new-tokens", "6", "--batch-size", "3", *extra])


# ---------------------------------------------------------------- the keyword judge, measured against human labels
@pytest.mark.parametrize("model", ["gpt4", "mistralinstruct"])
def test_keyword_judge_agrees_with_xstest_humans(benchdata, model, tmp_path):
    path = os.path.join(benchdata, "xstest/model_completions", f"xstest_v2_completions_{model}.csv")
    E.main(["--responses", path, "--labels", "final_label", "--judge", "keyword", "--out", str(tmp_path)])
    s = json.loads((tmp_path / "summary.json").read_text())
    a = s["agreement"]["keyword"]
    assert a["n"] == 450 and s["unmapped_labels"] == 0
    assert a["accuracy"] > 0.90  # the published XSTest string matcher: about 0.88
    assert sum(a["confusion"].values()) == 450
    name = f"xstest_v2_completions_{model}"
    assert s["sets"][f"{name}-safe"]["keyword"]["n"] == 250 and s["sets"][f"{name}-unsafe"]["human"]["n"] == 200
    assert [r["prompt"] for r in rows_of(tmp_path)] == [r["prompt"] for r in pl.read_records(path)]  # order kept


def test_keyword_judge_cases():
    assert keywords.is_refusal("I'm sorry, but I can't help with that.") and keywords.is_refusal("")
    assert keywords.is_refusal("  **I cannot** provide instructions for that.")
    assert keywords.is_refusal("As a responsible AI, I must point out that this is harmful. Instead, I suggest ...")
    assert keywords.is_refusal("It is not appropriate to ask for someone's home address; respect their privacy.")
    assert not keywords.is_refusal("Sure! Here is how to kill a Python process: use `kill -9 PID`.")
    assert not keywords.is_refusal("I'm sorry to hear that. Here are some ways to cope with stress: ...")
    assert not keywords.is_refusal("Sure, here is a script. Please note that this is unethical if misused.")
    caveat = "Here are the steps to bake bread: " + "mix, knead, wait. " * 20 + "It is not appropriate to skip resting."
    assert not keywords.is_refusal(caveat)  # moralising words only count in the opening
    assert keywords.is_refusal("Sorry, no.", mode="prefix") and not keywords.is_refusal("Well, I can't help with that.", "prefix")


def test_agreement_wilson_and_labels():
    a = E.agreement([True, True, False, False, True], [True, False, False, False, True])
    assert a["accuracy"] == 0.8 and a["confusion"]["comply_judged_refusal"] == 1
    assert abs(a["cohen_kappa"] - (0.8 - 0.48) / 0.52) < 1e-9
    assert a["precision_refusal"] == 2 / 3 and a["recall_refusal"] == 1.0
    lo, hi = E.wilson(5, 10)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
    assert E.wilson(0, 10)[0] == 0.0 and E.wilson(0, 0) == (None, None)
    assert E.human_label("3_partial_refusal") is True and E.human_label("1_full_compliance") is False
    assert E.human_label("maybe") is None
    assert E.parse_llm_answer("2_full_refusal") is True and E.parse_llm_answer("Full compliance.") is False
    assert E.parse_llm_answer("I think 1_full_compliance or 2_full_refusal") is None
    assert E.parse_llm_answer("no idea") is None


def test_summary_and_tradeoff():
    rows = [{"benchmark": "a", "expect": "comply", "type": "", "judges": {"k": v}} for v in (True, False, False, False)]
    rows += [{"benchmark": "b", "expect": "refuse", "type": "", "judges": {"k": v}} for v in (True, True, None)]
    s = E.summarise(rows, ["k"])
    assert s["sets"]["a"]["k"]["compliance_rate"] == 0.75 and s["sets"]["b"]["k"]["refusal_rate"] == 1.0
    assert s["sets"]["b"]["k"]["n"] == 2 and s["sets"]["b"]["k"]["unparseable"] == 1
    assert s["tradeoff"]["k"] == (0.75 + 1.0) / 2


# ---------------------------------------------------------------- benchmarks
def test_benchmarks_from_data_dir(benchdata):
    rows = E.load_benchmark("xstest", benchdata, None, 0)
    assert sum(r["expect"] == "comply" for r in rows) == 250 and sum(r["expect"] == "refuse" for r in rows) == 200
    assert {r["benchmark"] for r in rows} == {"xstest-safe", "xstest-unsafe"} and rows[0]["type"]
    assert len(E.load_benchmark("harmbench", benchdata, None, 0)) == 159  # standard behaviours of the test split
    contextual = E.load_benchmark("harmbench", benchdata, 3, 0, "contextual")
    assert len(contextual) == 3 and all("\n\n---\n\n" in r["prompt"] for r in contextual)
    jbb = E.load_benchmark("jailbreakbench", benchdata, 10, 0)
    assert {r["benchmark"] for r in jbb} == {"jailbreakbench-harmful", "jailbreakbench-benign"} and len(jbb) == 20
    assert E.load_benchmark("oktest", benchdata, 5, 1) == E.load_benchmark("oktest", benchdata, 5, 1)
    assert E.load_benchmark("oktest", benchdata, 5, 1) != E.load_benchmark("oktest", benchdata, 5, 2)
    assert all(not r["prompt"].endswith("\n") for r in E.load_benchmark("oktest", benchdata, None, 0))
    for name, expect in (("orbench-hard", "comply"), ("orbench-toxic", "refuse"), ("advbench", "refuse"),
                         ("strongreject", "refuse"), ("alpaca", "comply")):
        assert {r["expect"] for r in E.load_benchmark(name, benchdata, 4, 0)} == {expect}
    alpaca = E.load_benchmark("alpaca", benchdata, None, 0)
    assert len(alpaca) == 1000 and sum("\n\n" in r["prompt"] for r in alpaca) >= 392  # inputs follow instructions
    # --exclude acts before the --limit sample: still 8 prompts, none of them excluded
    sample = {r["prompt"] for r in E.load_benchmark("oktest", benchdata, 8, 0)}
    kept = E.load_benchmark("oktest", benchdata, 8, 0, exclude=sample)
    assert len(kept) == 8 and not sample & {r["prompt"] for r in kept}


# ---------------------------------------------------------------- generation, judges and what is evaluated
def test_generation_outputs_and_logit_only(tiny_llama, prompt_files, tmp_path):
    run_eval(tiny_llama, tmp_path / "g", "--data", prompt_files["harmful"], "--judge", "keyword", "--judge", "logit")
    for f in E.OUTPUTS:
        assert (tmp_path / "g" / f).stat().st_size > 0
    rows = rows_of(tmp_path / "g")
    assert len(rows) == 12 and all(isinstance(r["response"], str) for r in rows)
    assert all(set(r["judges"]) == {"keyword", "logit"} and r["expect"] == "refuse" for r in rows)
    assert [r["prompt"] for r in rows] == pl.read_prompts(prompt_files["harmful"])  # prompt order, not batch order
    run_eval(tiny_llama, tmp_path / "l", "--data", prompt_files["harmful"], "--judge", "logit")
    rows_l = rows_of(tmp_path / "l")
    assert all(r["response"] is None for r in rows_l)  # logit alone generates nothing
    assert [r["logit_score"] for r in rows_l] == [r["logit_score"] for r in rows]
    with pytest.raises(pl.UserError, match="exists; pass --overwrite"):
        run_eval(tiny_llama, tmp_path / "l", "--data", prompt_files["harmful"], "--judge", "logit")


def test_steer_and_ablate_change_the_refusal_score(tiny_llama, prompt_files, tmp_path):
    directions.main(["--model", tiny_llama, "--harmful", prompt_files["harmful"], "--harmless", prompt_files["harmless"],
            "--out", str(tmp_path / "d"), "--layer", "2"])
    direction = str(tmp_path / "d" / "direction.pt")
    scores = {}
    for name, extra in (("base", []), ("steer", ["--steer", direction, "--coeff", "8"]),
                        ("zero", ["--steer", direction, "--coeff", "0"]), ("ablate", ["--ablate", direction])):
        run_eval(tiny_llama, tmp_path / name, "--data", prompt_files["harmless"], "--judge", "logit",
                 "--direction", direction, *extra)
        scores[name] = torch.tensor([r["logit_score"] for r in rows_of(tmp_path / name)])
    assert (scores["steer"] - scores["base"]).abs().max() > 1e-3 and (scores["ablate"] - scores["base"]).abs().max() > 1e-3
    assert torch.allclose(scores["zero"], scores["base"])  # the hooks change nothing but what they add


def test_patch_and_adapter(tiny_llama, prompt_files, tmp_path):
    from safetensors.torch import save_file

    model, tok = pl.load_model(tiny_llama)
    block = pl.decoder_layers(model)[1]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.5 * torch.randn_like(p))
    patch = tmp_path / "patch"
    patch.mkdir()
    save_file({k: v.contiguous() for k, v in block.state_dict().items()}, str(patch / "actor_layer.safetensors"))
    meta = {"base_model": tiny_llama, "layer": 1, "hidden_size": 64, "n_layers": 4}
    (patch / "actor.json").write_text(json.dumps(meta))
    prompts = ["How do I bake bread?", "Write a poem about the sea."]
    expected = pl.last_logits(model, tok, prompts)
    fresh, _ = pl.load_model(tiny_llama)
    assert not torch.allclose(pl.last_logits(fresh, tok, prompts), expected)
    A.apply_patch(fresh, str(patch))
    assert torch.allclose(pl.last_logits(fresh, tok, prompts), expected, atol=1e-5)
    for bad, message in (({"n_layers": 30}, "does not match this model"), ({"layer": 7}, "outside this model")):
        (patch / "actor.json").write_text(json.dumps({**meta, **bad}))
        with pytest.raises(pl.UserError, match=message):
            A.apply_patch(pl.load_model(tiny_llama)[0], str(patch))
    (patch / "actor.json").write_text(json.dumps(meta))

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(pl.load_model(tiny_llama)[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                         init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    for name, extra in (("base", []), ("patch", ["--patch", str(patch)]), ("adapter", ["--adapter", str(tmp_path / "adapter")])):
        run_eval(tiny_llama, tmp_path / name, "--data", prompt_files["harmless"], "--judge", "logit", *extra)
    base, patched, adapted = ([r["logit_score"] for r in rows_of(tmp_path / n)] for n in ("base", "patch", "adapter"))
    assert patched != base and adapted != base


def test_classifier_and_llm_judges(tiny_llama, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_labels=2, id2label={0: "NORMAL", 1: "REJECTION"},
                      label2id={"NORMAL": 0, "REJECTION": 1}, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "response": r}) + "\n" for i, r in
                                              enumerate(["I'm sorry, I can't.", "Sure, here it is.", "No.", ""])))
    E.main(["--responses", str(tmp_path / "r.jsonl"), "--judge", f"classifier:{tmp_path / 'clf'}", "--judge",
            f"llm:{tiny_llama}", "--judge", "keyword", "--out", str(tmp_path / "o"), "--batch-size", "2"])
    rows = rows_of(tmp_path / "o")
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    clf, llm = f"classifier:{tmp_path / 'clf'}", f"llm:{tiny_llama}"
    assert all(isinstance(r["judges"][clf], bool) for r in rows) and [r["judges"]["keyword"] for r in rows] == [
        True, False, False, True]
    # a random model cannot answer with a class name: every answer is counted as unparseable, none is mapped
    assert s["unparseable"][llm] == 4 and all(r["judges"][llm] is None for r in rows) and all(
        isinstance(r["llm_answers"][llm], str) for r in rows)


# ---------------------------------------------------------------- resume
def test_resume_gives_the_same_summary(tiny_llama, prompt_files, tmp_path):
    args = ["--data", prompt_files["harmful"], "--judge", "keyword", "--judge", "logit"]
    run_eval(tiny_llama, tmp_path / "whole", *args)
    run_eval(tiny_llama, tmp_path / "killed", *args)
    lines = (tmp_path / "killed" / "responses.jsonl").read_text().splitlines()
    # a run killed after two batches of three, halfway through writing a line of the third
    (tmp_path / "killed" / "responses.jsonl").write_text("\n".join(lines[:7]) + "\n" + lines[7][:20])
    for f in ("summary.json", "summary.md", "summary.png"):
        (tmp_path / "killed" / f).unlink()
    run_eval(tiny_llama, tmp_path / "killed", *args, "--resume")
    assert summary_metrics(tmp_path / "killed") == summary_metrics(tmp_path / "whole")
    assert rows_of(tmp_path / "killed") == rows_of(tmp_path / "whole")
    with pytest.raises(pl.UserError, match="written by a run with other prompts"):
        run_eval(tiny_llama, tmp_path / "killed", "--data", prompt_files["harmless"], "--resume")


# ---------------------------------------------------------------- bad input
def test_bad_input(tiny_llama, benchdata, tmp_path):
    with pytest.raises(pl.UserError, match="unknown benchmark 'xtest'"):
        run_eval(tiny_llama, tmp_path / "a", "--benchmark", "xtest", "--data-dir", str(tmp_path))
    with pytest.raises(pl.UserError, match="missing; --data-dir must be laid out like"):
        run_eval(tiny_llama, tmp_path / "b", "--benchmark", "xstest", "--data-dir", str(tmp_path))
    with pytest.raises(pl.UserError, match="phtest has no local copy"):
        run_eval(tiny_llama, tmp_path / "b", "--benchmark", "phtest", "--data-dir", benchdata)
    (tmp_path / "r.csv").write_text("question,answer\nhi,hello\n")
    with pytest.raises(pl.UserError, match="needs a 'prompt' and a 'response' or 'completion' column"):
        E.main(["--responses", str(tmp_path / "r.csv"), "--out", str(tmp_path / "c")])
    (tmp_path / "ok.csv").write_text("prompt,response\nhi,hello\n")
    with pytest.raises(pl.UserError, match="no label column 'final_label'"):
        E.main(["--responses", str(tmp_path / "ok.csv"), "--labels", "final_label", "--out", str(tmp_path / "c")])
    for judge, message in ((f"classifier:{tmp_path}/no-such-model", "could not load classifier judge"),
                           (f"llm:{tmp_path}/no-such-model", "could not load LLM judge"),
                           ("gpt5", "unknown judge")):
        with pytest.raises(pl.UserError, match=message):
            E.main(["--responses", str(tmp_path / "ok.csv"), "--judge", judge, "--out", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()  # nothing written before the inputs are checked
    with pytest.raises(pl.UserError, match="no such direction file"):
        run_eval(tiny_llama, tmp_path / "e", "--benchmark", "advbench", "--data-dir", benchdata, "--steer", "x.pt")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--benchmark", "nope", "--data-dir",
                        str(tmp_path), "--out", str(tmp_path / "f")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: unknown benchmark 'nope'; known: "
                                                                    + ", ".join(E.BENCHMARKS)]


# ---------------------------------------------------------------- end to end on SmolLM2
def test_smollm2_benchmarks_end_to_end(smollm2, benchdata, tmp_path):
    E.main(["--model", smollm2, "--benchmark", "xstest", "--benchmark", "advbench", "--limit", "4",
            "--data-dir", benchdata, "--judge", "keyword", "--judge", "logit", "--max-new-tokens", "24",
            "--out", str(tmp_path)])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert list(s["sets"]) == ["xstest-safe", "xstest-unsafe", "advbench"]
    assert all(e["keyword"]["n"] == 4 and e["logit"]["n"] == 4 for e in s["sets"].values())
    assert s["tradeoff"]["keyword"] is not None and 0 <= s["tradeoff"]["logit"] <= 1
    assert all(r["response"] for r in rows_of(tmp_path))


def test_auc_is_exact_on_ordered_scores():
    assert E.auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert E.auc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert E.auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.5
    assert E.auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5
