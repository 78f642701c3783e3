"""procon.py: the loss, the anchors, the schedule, what training touches, resume, bad input; and the over-refusing
model it builds, on which the refusal direction is causal."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, snapshot
from transformers import AutoTokenizer

import chat
import cli
import evaluate
import inference
import judges
import keywords
import loading
import procon as P
import rundir
import training as T


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FLAGS = []  # small prompt sets for the r-directions and the drift probe (set by the fixture below)


@pytest.fixture(scope="module", autouse=True)
def small_prompts(prompt_files):
    FLAGS[:] = ["--harmful", prompt_files["harmful"], "--harmless", prompt_files["harmless"],
                "--probe-harmful", prompt_files["harmful"], "--probe-harmless", prompt_files["harmless"]]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    rows = [{"instruction": f"How do I bake bread number {i}?", "input": "", "output": f"Mix flour and water {i}."}
            for i in range(10)]
    (d / "pairs.json").write_text(json.dumps(rows))
    return str(d / "pairs.json")


def run(model, data, out, *extra):
    P.main(["--model", model, "--data", data, "--out", str(out), "--epochs", "2", "--batch-size", "4",
            "--max-length", "64", *FLAGS, *extra])
    return json.loads((out / "procon.json").read_text())


def test_alpha0_loss_is_plain_ce(tiny_llama, pairs_file):
    model, tok = loading.load_model(tiny_llama)
    examples = [P.encode_pair(tok, p, a, 64, "response") for p, a in T.read_pairs(pairs_file)[:4]]
    batch = P.collate(examples, tok.pad_token_id)
    ce_sum, hs, resp = P.forward(model, batch, "cpu")
    hf = model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
    torch.testing.assert_close(ce_sum / (batch[2][:, 1:] != -100).sum(), hf)
    assert len(hs) == 5 and resp.sum() == sum(sum(l != -100 for l in e[1]) for e in examples)
    # the prompt carries no loss: every label before the response is -100
    prompt_len = len(tok(chat.format_chat(tok, [T.read_pairs(pairs_file)[0][0]])[0],
                         add_special_tokens=False).input_ids)
    assert all(l == -100 for l in examples[0][1][:prompt_len]) and examples[0][1][prompt_len] != -100


def test_constraint_is_zero_at_step0_and_alpha0_is_plain_ift(tiny_llama, pairs_file, tmp_path):
    log = run(tiny_llama, pairs_file, tmp_path / "c", "--alpha", "1.0")
    assert log["steps"][0]["constraint"] == 0.0  # same weights, same batch: z = z0 exactly
    assert max(s["constraint"] for s in log["steps"]) > 0  # and it moves once training does
    log0 = run(tiny_llama, pairs_file, tmp_path / "i", "--alpha", "0")
    assert all(s["constraint"] == 0.0 and s["alpha"] == 0 for s in log0["steps"])
    # with no constraint the CE of the first step is the same as the constrained run's (identical start)
    assert log0["steps"][0]["ce"] == log["steps"][0]["ce"]


def test_hidden_states_are_layer_inputs(tiny_llama, pairs_file):
    """hidden_states[l] of the training forward is the input to decoder layer l, as in directions.capture."""
    model, tok = loading.load_model(tiny_llama)
    batch = P.collate([P.encode_pair(tok, p, a, 64, "response") for p, a in T.read_pairs(pairs_file)[:3]],
                      tok.pad_token_id)
    seen = {}
    pairs = [(layer, "pre", lambda m, a, k, i=i: seen.__setitem__(i, inference.hidden_of(a, k).clone()))
             for i, layer in enumerate(loading.decoder_layers(model))]
    with inference.hooks(pairs):
        ce, hs, resp = P.forward(model, batch, "cpu")
    for l in range(4):
        torch.testing.assert_close(hs[l], seen[l])
    r = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    z = P.projections(hs, resp, r, [1, 3])
    assert z.shape == (2, resp.sum())
    torch.testing.assert_close(z[1], seen[3][resp] @ r[3])
    assert P.forward(model, batch, "cpu", hidden=False)[1] is None  # alpha = 0: no hidden states asked for


def test_anchors_one_pass_and_layers(tiny_llama, pairs_file, prompt_files):
    """z0 of every example at its constrained positions and layers, under the initial weights; r_l a unit vector at
    every layer but 0."""
    model, tok = loading.load_model(tiny_llama)
    examples = [P.encode_pair(tok, p, a, 64, "prompt") for p, a in T.read_pairs(pairs_file)]
    batches = P.fixed_batches(examples, 4, 1, 0)
    r_hat = P.r_directions(model, tok, chat.read_prompts(prompt_files["harmful"]), chat.read_prompts(
        prompt_files["harmless"]), 4, "r")
    assert r_hat.shape == (4, 64) and torch.equal(r_hat[0], torch.zeros(64))
    torch.testing.assert_close(r_hat[1:].norm(dim=-1), torch.ones(3))
    start = P.anchors(model, examples, batches, r_hat, [1, 3], tok.pad_token_id)
    assert len(start["z0"]) == 10 and all(z.shape == (2, 1) for z in start["z0"])  # one prompt token, 2 layers
    batch = P.collate(examples[:1], tok.pad_token_id)
    _, hs, cmask = P.forward(model, batch, "cpu")
    torch.testing.assert_close(start["z0"][0], P.projections(hs, cmask, r_hat, [1, 3]))


def test_safety_data_is_mixed_in(tiny_llama, pairs_file, prompt_files, tmp_path):
    log = run(tiny_llama, pairs_file, tmp_path, "--alpha", "0.5", "--safety-data", prompt_files["harmful"],
              "--safety-n", "6")
    assert log["n_train"] == 10 and log["n_safety"] == 6
    assert len(log["steps"]) == 2 * 4  # 16 samples in batches of 4, every epoch


def test_constraint_reductions():
    z0 = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    z = z0 + torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.0, 0.0]])
    assert P.constraint(z, z0, "abs", "sum", n_samples=2).item() == 2.0  # (1 + 1 + 2) / 2 samples
    assert P.constraint(z, z0, "sq", "sum", n_samples=2).item() == 3.0  # (1 + 1 + 4) / 2
    assert abs(P.constraint(z, z0, "abs", "mean").item() - 4 / 6) < 1e-6  # 2 layers x 3 tokens
    assert abs(P.constraint(z, z0, "abs", "mean", n_positions=6).item() - 4 / 12) < 1e-6  # a step of 6 tokens
    scale = torch.tensor([2.0, 1.0])  # --scale anchor-rms: each layer's deviation over its anchors' RMS
    assert P.constraint(z, z0, "abs", "sum", n_samples=2, scale=scale).item() == (0.5 + 0.5 + 2) / 2


def killed_at_commit(monkeypatch):
    """The next run dies after its last checkpoint, before its outputs are committed: its work stays for --resume."""
    def die(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(rundir, "commit", die)


def last_checkpoint(out):
    return rundir.last_checkpoint(os.path.join(out, rundir.WORK))[1]


def test_warmup_schedule(tiny_llama, pairs_file, tmp_path, monkeypatch):
    args = P.parse_args(["--alpha", "0.1", "--warmup-epochs", "2", "--warmup-alpha", "2"])
    assert [P.alpha_at(s, args, 4) for s in range(8)] == [2, 2, 2, 2, 0.1, 0.1, 0.1, 0.1]  # 2 epochs of 2 steps
    log = run(tiny_llama, pairs_file, tmp_path / "a", "--epochs", "3", "--warmup-epochs", "1", "--warmup-alpha", "1")
    assert [e["alpha"] for e in log["epochs"]] == [1.0, 0.0, 0.0]
    drift = json.loads((tmp_path / "a" / "drift.json").read_text())["cosine_to_initial"]
    assert set(drift) == {"1", "2", "3"} and all(-1 <= c <= 1.0001 for c in drift["1"].values())
    # one AdamW throughout (3 epochs of 3 batches); with --reset-optimizer it starts afresh when the warm-up ends
    def steps(out):
        state = torch.load(os.path.join(last_checkpoint(out), "optimizer.pt"), weights_only=True)["state"]
        return {int(s["step"]) for s in state.values()}

    killed_at_commit(monkeypatch)
    for name, extra, want in (("b", [], {9}), ("c", ["--reset-optimizer"], {6})):
        with pytest.raises(KeyboardInterrupt):
            run(tiny_llama, pairs_file, tmp_path / name, "--epochs", "3", "--warmup-epochs", "1", "--warmup-alpha",
                "1", *extra)
        assert steps(tmp_path / name) == want
    # a warm-up of 4 steps, inside the second epoch: alpha per step, and AdamW restarted after step 4 (5 steps left)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama, pairs_file, tmp_path / "d", "--epochs", "3", "--warmup-steps", "4", "--warmup-alpha", "1",
            "--reset-optimizer")
    assert steps(tmp_path / "d") == {5}
    state = json.loads(open(os.path.join(last_checkpoint(tmp_path / "d"), "state.json")).read())
    assert [s["alpha"] for s in state["log"]["steps"]] == [1.0] * 4 + [0.0] * 5


def test_evaluation_points(tiny_llama, pairs_file, prompt_files, tmp_path):
    """--eval-every: held-out CE, drift and the logit judge's refusal rate of each --eval-refusal file before training,
    every N steps and at each epoch's end, each once; the epochs' summaries carry their end's point."""
    log = run(tiny_llama, pairs_file, tmp_path, "--alpha", "0.3", "--eval-every", "2", "--eval-data", pairs_file,
              "--eval-refusal", prompt_files["harmful"], "--eval-refusal", prompt_files["harmless"])
    assert [e["step"] for e in log["evals"]] == [0, 2, 3, 4, 6]  # 3 steps an epoch, 2 epochs
    assert all(set(e["refusal"]) == {"harmful", "harmless"} and 0 <= e["refusal"]["harmful"] <= 1 and
               e["eval_ce"] > 0 and len(e["drift"]) == 3 for e in log["evals"])
    assert all(abs(c - 1) < 1e-5 for c in log["evals"][0]["drift"].values())  # before training: the same direction
    assert [(e["epoch"], e["eval_ce"]) for e in log["epochs"]] == [(1, log["evals"][2]["eval_ce"]),
                                                                   (2, log["evals"][4]["eval_ce"])]
    assert log["evals"][0]["eval_ce"] != log["evals"][-1]["eval_ce"]  # training moved the task loss


def test_lora_changes_only_adapters(tiny_llama, pairs_file, tmp_path):
    from safetensors.torch import load_file

    run(tiny_llama, pairs_file, tmp_path, "--alpha", "0.5")
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert len(adapter) == 2 * 4 * 4  # A and B for q, k, v, o in each of 4 layers
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B started at 0 and moved


def test_full_changes_every_weight(tiny_llama, pairs_file, tmp_path):
    run(tiny_llama, pairs_file, tmp_path, "--full", "--alpha", "0.5", "--lr", "1e-3")
    base, _ = loading.load_model(tiny_llama)
    tuned, _ = loading.load_model(str(tmp_path / "model"))
    new = dict(tuned.named_parameters())
    unchanged = [k for k, v in base.named_parameters() if torch.equal(v, new[k])]
    assert unchanged == []


def kill_after_checkpoint(monkeypatch, n):
    """The next run dies right after its n-th checkpoint is whole."""
    save, seen = rundir.write_checkpoint, []

    def save_then_die(*args):
        save(*args)
        seen.append(1)
        if len(seen) == n:
            raise KeyboardInterrupt
    monkeypatch.setattr(rundir, "write_checkpoint", save_then_die)


def test_resume_after_kill_gives_the_same_adapter(tiny_llama, pairs_file, tmp_path, monkeypatch):
    run(tiny_llama, pairs_file, tmp_path / "whole", "--alpha", "0.3", "--save-every", "2")
    kill_after_checkpoint(monkeypatch, 2)  # killed after step 2 and step 3 (the first epoch's end) were saved
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama, pairs_file, tmp_path / "killed", "--alpha", "0.3", "--save-every", "2")
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "adapter").exists() and last_checkpoint(tmp_path / "killed").endswith("0000003")
    with pytest.raises(cli.UserError, match="holds an unfinished run; continue it with --resume"):
        run(tiny_llama, pairs_file, tmp_path / "killed", "--alpha", "0.3")
    log = run(tiny_llama, pairs_file, tmp_path / "killed", "--alpha", "0.3", "--resume")
    a = (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "killed" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b and len(log["steps"]) == 6 and [e["epoch"] for e in log["epochs"]] == [1, 2]
    assert not (tmp_path / "killed" / rundir.WORK).exists()  # committed: the work folder is gone


def test_resume_checks_what_it_resumes(tiny_llama, pairs_file, tmp_path, monkeypatch):
    """A resume with other settings, or with a data file rewritten in place, is refused, naming what changed."""
    data = tmp_path / "pairs.json"
    data.write_text(open(pairs_file).read())
    kill_after_checkpoint(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama, str(data), tmp_path / "k", "--alpha", "0.3")
    monkeypatch.undo()
    with pytest.raises(cli.UserError, match=r"--resume with --lr 0.001, but the run in .* began with 0.0002"):
        run(tiny_llama, str(data), tmp_path / "k", "--alpha", "0.3", "--resume", "--lr", "1e-3")
    with pytest.raises(cli.UserError, match="--resume with --alpha 0.7"):
        run(tiny_llama, str(data), tmp_path / "k", "--alpha", "0.7", "--resume")
    # --grad-accum left unset is recorded as the number it resolves to (1 process: 1), so 2 is refused, 1 is not
    assert json.loads((tmp_path / "k" / rundir.WORK / rundir.SETTINGS).read_text())["grad_accum"] == 1
    with pytest.raises(cli.UserError, match=r"--resume with --grad-accum 2, but the run in .* began with 1"):
        run(tiny_llama, str(data), tmp_path / "k", "--alpha", "0.3", "--resume", "--grad-accum", "2")
    rows = json.loads(data.read_text())
    data.write_text(json.dumps([{**r, "output": r["output"] + " Then bake."} for r in rows]))  # same count, same path
    with pytest.raises(cli.UserError, match="the file or folder of --data has other contents"):
        run(tiny_llama, str(data), tmp_path / "k", "--alpha", "0.3", "--resume")
    data.write_text(json.dumps(rows + rows[:3]))  # more rows: refused the same way, not an IndexError
    with pytest.raises(cli.UserError, match="the file or folder of --data has other contents"):
        run(tiny_llama, str(data), tmp_path / "k", "--alpha", "0.3", "--resume")
    data.write_text(json.dumps(rows))
    log = run(tiny_llama, str(data), tmp_path / "k", "--alpha", "0.3", "--resume", "--epochs", "3")  # may grow
    assert len(log["steps"]) == 9


def test_bad_input(tiny_llama, pairs_file, tmp_path):
    (tmp_path / "prompts.json").write_text(json.dumps(["just a prompt"]))
    with pytest.raises(cli.UserError, match="row 1 is not usable: expected instruction/output, prompt/response"):
        run(tiny_llama, str(tmp_path / "prompts.json"), tmp_path / "a")
    (tmp_path / "mixed.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"Instruction": "c",
                                                                                         "Output": "d"}]))
    with pytest.raises(cli.UserError, match="row 2 is not usable.*it has Instruction, Output"):  # not dropped silently
        run(tiny_llama, str(tmp_path / "mixed.json"), tmp_path / "a")
    for row, empty in (({"instruction": "a", "output": " "}, "response"), ({"prompt": "", "response": "b"}, "prompt"),
                       ({"prompt": "a", "response": ""}, "response")):
        (tmp_path / "blank.json").write_text(json.dumps([{"instruction": "c", "output": "d"}, row]))
        with pytest.raises(cli.UserError, match=f"row 2 has an empty {empty}"):  # not dropped
            T.read_pairs(str(tmp_path / "blank.json"))
    with pytest.raises(cli.UserError, match="layer 9 is out of range"):
        run(tiny_llama, pairs_file, tmp_path / "b", "--layers", "1,9")
    (tmp_path / "safety.jsonl").write_text('{"prompt": "x"}\n{broken\n')
    with pytest.raises(cli.UserError, match="line 2 is not valid JSON"):
        run(tiny_llama, pairs_file, tmp_path / "c", "--safety-data", str(tmp_path / "safety.jsonl"))
    with pytest.raises(cli.UserError, match="no unfinished run to resume"):
        run(tiny_llama, pairs_file, tmp_path / "f", "--resume")


def test_a_loss_that_is_not_finite_keeps_the_last_checkpoint(tiny_llama, pairs_file, tmp_path, monkeypatch):
    """A step whose loss is NaN stops the run in one line; the last whole checkpoint stays for --resume."""
    calls = []
    loss = P.training_loss

    def nan_on_step_4(*args, **kwargs):
        calls.append(1)
        out = loss(*args, **kwargs)
        return (out[0] * float("nan"),) + out[1:] if len(calls) == 4 else out
    monkeypatch.setattr(P, "training_loss", nan_on_step_4)
    with pytest.raises(cli.UserError) as e:
        run(tiny_llama, pairs_file, tmp_path, "--alpha", "0.3")
    assert str(e.value) == ("the loss at step 4 became NaN; the likely cause: --alpha 0.3 (else --lr 0.0002) is too "
                            "large: try a smaller value with --overwrite (the checkpoint of step 3 is kept)")
    assert last_checkpoint(tmp_path).endswith("0000003") and not (tmp_path / "adapter").exists()


def test_a_loss_that_is_not_finite_before_any_checkpoint_says_so(tiny_llama, pairs_file, tmp_path, monkeypatch):
    """A NaN loss at the first step: the message names the flag most likely to blame and says that no checkpoint was
    written (not that one is kept); the work folder goes with the run."""
    loss = P.training_loss
    monkeypatch.setattr(P, "training_loss", lambda *a, **k: (loss(*a, **k)[0] * float("nan"),) + loss(*a, **k)[1:])
    with pytest.raises(cli.UserError) as e:
        run(tiny_llama, pairs_file, tmp_path, "--alpha", "0.3", "--warmup-epochs", "1", "--warmup-alpha", "5")
    assert str(e.value) == ("the loss at step 1 became NaN; the likely cause: --warmup-alpha 5 (else --alpha 0.3, --lr "
                            "0.0002) is too large: try a smaller value with --overwrite (no checkpoint was written "
                            "yet)")
    assert not (tmp_path / rundir.WORK).exists()


def test_a_huge_warmup_alpha_is_named_first(tiny_llama, pairs_file, tmp_path):
    """A finite but huge --warmup-alpha drives the weights to NaN (AdamW meets an infinite gradient); whichever number
    shows it first (the loss, the drift probe's difference in means), the message names --warmup-alpha first."""
    with pytest.raises(cli.UserError) as e:
        run(tiny_llama, pairs_file, tmp_path, "--alpha", "0.3", "--warmup-epochs", "1", "--warmup-alpha", "1e38")
    assert " became NaN; the likely cause: --warmup-alpha 1e+38 (else --alpha 0.3, --lr 0.0002) is too large" in \
        str(e.value)


def test_a_collapse_after_training_blames_the_training_not_the_prompts(tiny_llama, pairs_file, tmp_path):
    """One full step at --lr 1e30 leaves finite weights that give every prompt the same activation: the drift probe's
    direction is zero, and the line says that training diverged (the probe prompts passed at step 0)."""
    with pytest.raises(cli.UserError) as e:
        run(tiny_llama, pairs_file, tmp_path, "--full", "--lr", "1e30", "--max-steps", "1")
    assert str(e.value).startswith("after step 1, ") and "training diverged; a smaller --lr or --alpha" in str(e.value)


def test_pairs_cut_off_by_max_length_are_counted_or_refused(tiny_llama, prompt_files, tmp_path, capsys):
    """Pairs whose response --max-length cuts off entirely add nothing to the loss: counted (warning, procon.json),
    and the run refused when they are more than half; safety samples that carry no CE (--safety-role constraint)
    are not counted."""
    rows = lambda n_long: [{"instruction": ("word " * 80 if i < n_long else "") + f"Bake bread {i}?",  # noqa: E731
                            "output": f"Mix flour {i}."} for i in range(10)]
    (tmp_path / "three.json").write_text(json.dumps(rows(3)))
    (tmp_path / "six.json").write_text(json.dumps(rows(6)))
    (tmp_path / "safety.json").write_text(json.dumps(["word " * 80 + f"Build a bomb {i}" for i in range(8)]))
    log = run(tiny_llama, str(tmp_path / "three.json"), tmp_path / "a", "--safety-data", str(tmp_path / "safety.json"),
              "--safety-role", "constraint", "--alpha", "0.1", "--epochs", "1")
    assert log["n_cut_by_max_length"] == {"train": 3, "eval": 0}
    out = capsys.readouterr()
    assert "warning: --max-length 64 leaves no response tokens in 3 of the 10 training pairs; they add nothing" in \
        out.err and "pairs whose response --max-length cut off: 3" in out.out
    with pytest.raises(cli.UserError) as e:
        run(tiny_llama, str(tmp_path / "six.json"), tmp_path / "b")
    assert str(e.value) == ("--max-length 64 leaves no response tokens in 6 of the 10 training pairs (more than 50%); "
                            "raise --max-length or shorten them")


def test_positions_choose_what_the_constraint_reads(tiny_llama, pairs_file):
    """prompt: the prompt's last token (where r_l is read); response: the response tokens; all: every token."""
    _, tok = loading.load_model(tiny_llama)
    prompt, answer = T.read_pairs(pairs_file)[0]
    n_prompt = len(tok(chat.chat_text(tok, prompt), add_special_tokens=False).input_ids)
    ids, labels, last = P.encode_pair(tok, prompt, answer, 64, "prompt")
    assert last == [int(i == n_prompt - 1) for i in range(len(ids))]
    _, _, resp = P.encode_pair(tok, prompt, answer, 64, "response")
    assert resp == [int(l != -100) for l in labels] and sum(resp) == len(ids) - n_prompt
    assert P.encode_pair(tok, prompt, answer, 64, "all")[2] == [1] * len(ids)
    _, no_ce, cm = P.encode_pair(tok, prompt, answer, 64, "response", ce=False)  # --safety-role constraint
    assert set(no_ce) == {-100} and cm == resp


def test_safety_role_constraint_only(tiny_llama, pairs_file, prompt_files, tmp_path):
    """Safety samples that enter the constraint only: no CE on their refusals, so with alpha 0 they change nothing."""
    common = ["--alpha", "0", "--safety-data", prompt_files["harmful"], "--safety-n", "6", "--epochs", "1"]
    run(tiny_llama, pairs_file, tmp_path / "a", *common, "--safety-role", "constraint")
    log = run(tiny_llama, pairs_file, tmp_path / "b", *common, "--safety-role", "ce+constraint")
    a = (tmp_path / "a" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a != b and log["n_safety"] == 6
    con = run(tiny_llama, pairs_file, tmp_path / "c", "--alpha", "1", "--safety-data", prompt_files["harmful"],
              "--safety-n", "6", "--safety-role", "constraint", "--constrained-tokens", "response")
    assert all(math.isfinite(s["ce"]) for s in con["steps"]) and max(s["constraint"] for s in con["steps"]) > 0


def trained(tiny, data, out, *extra):
    from safetensors.torch import load_file

    P.main(["--model", tiny, "--data", data, "--out", str(out), "--epochs", "1", "--max-length", "64", "--lr", "1e-3",
            *FLAGS, *extra])
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), json.loads((out / "procon.json").read_text())


@pytest.mark.parametrize("alpha", ["0", "0.5"])
def test_grad_accum_equals_the_larger_batch(tiny_llama, pairs_file, tmp_path, alpha):
    w8, log8 = trained(tiny_llama, pairs_file, tmp_path / "b8", "--batch-size", "8", "--alpha", alpha)
    w4, log4 = trained(tiny_llama, pairs_file, tmp_path / "b4x2", "--batch-size", "4", "--grad-accum", "2",
                       "--alpha", alpha)
    assert len(log8["steps"]) == len(log4["steps"]) == 2  # 10 pairs: optimizer batches of 8 and 2
    for k in w8:
        torch.testing.assert_close(w4[k], w8[k], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llama, pairs_file):
    args = P.parse_args(["--alpha", "0.5", "--constrained-tokens", "all"])
    grads, losses = [], []
    for ckpt in (False, True):
        model, tok = loading.load_model(tiny_llama)
        args.gradient_checkpointing = ckpt
        r = torch.nn.functional.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
        examples = [P.encode_pair(tok, p, a, 64, "all") for p, a in T.read_pairs(pairs_file)[:4]]
        batch = P.collate(examples, tok.pad_token_id)
        model, params = T.make_trainable(model, args)
        assert all(b.gradient_checkpointing == ckpt and b.training == ckpt for b in loading.decoder_layers(model))
        with torch.no_grad():
            for p in params:  # LoRA B starts at 0; give it weights so that every gradient is non-trivial
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        z0 = torch.zeros(3, int(batch[3].sum()))
        norm = {"tokens": int((batch[2][:, 1:] != -100).sum()), "samples": 4, "positions": int(batch[3].sum())}
        loss, _, _ = P.training_loss(model, batch, "cpu", r, z0, 0.5, [1, 2, 3], args, norm)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in params])
    assert abs(losses[0] - losses[1]) < 1e-6
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_chunked_ce_gives_the_same_loss_and_gradients(arch_model, pairs_file):
    """--ce-chunk: logits made a few tokens at a time from the final hidden state give the model's own CE and the
    same gradients, on every architecture (Gemma-2's soft-capping included)."""
    arch, path = arch_model
    model, tok = loading.load_model(path)
    examples = [P.encode_pair(tok, p, a, 64, "response") for p, a in T.read_pairs(pairs_file)[:3]]
    batch = P.collate(examples, tok.pad_token_id)
    P.check_ce_chunk(P.forward, model, batch, "cpu", 5)  # passes: the same CE
    head = model.get_output_embeddings().weight
    head.requires_grad_(True)
    results = []
    for chunk in (0, 5):
        head.grad = None
        ce_sum, _, _ = P.forward(model, batch, "cpu", hidden=False, ce_chunk=chunk)
        ce_sum.backward()
        results.append((ce_sum.item(), head.grad.clone()))
    assert abs(results[0][0] - results[1][0]) < 1e-3 * abs(results[0][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


def test_lr_schedule_and_max_steps(tiny_llama, pairs_file, tmp_path):
    assert [P.lr_at(s, 8, 1, 0.25, "linear") for s in range(8)] == pytest.approx(
        [0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert P.lr_at(2, 8, 1, 0.25, "cosine") == 1.0 and abs(P.lr_at(5, 8, 1, 0.25, "cosine") - 0.5) < 1e-9
    log = run(tiny_llama, pairs_file, tmp_path, "--alpha", "0.3", "--max-steps", "4", "--lr-scheduler", "cosine")
    assert len(log["steps"]) == 4 and log["steps"][-1]["lr"] < log["steps"][0]["lr"]  # 3 steps an epoch: stops in 2nd


def test_merge_equals_base_plus_adapter(tiny_llama, pairs_file, tmp_path):
    from peft import PeftModel

    run(tiny_llama, pairs_file, tmp_path / "run", "--alpha", "0.3", "--lr", "1e-2", "--save-merged")
    merged, tok = loading.load_model(str(tmp_path / "run" / "merged"))
    base, _ = loading.load_model(tiny_llama)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    enc = chat.tokenize(tok, chat.format_chat(tok, ["How do I bake bread?"]), "cpu")
    plain, _ = loading.load_model(tiny_llama)
    with torch.no_grad():
        want, got = peft_model(**enc).logits, merged(**enc).logits
        assert (want - plain(**enc).logits).abs().max() > 1e-4  # the adapter changed something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    P.main(["--merge", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "m2")])  # base from the adapter
    assert (tmp_path / "m2" / "model.safetensors").exists() and (tmp_path / "m2" / "tokenizer_config.json").exists()


def test_lora_targets(tiny_llama, tiny_neox):
    llama, _ = loading.load_model(tiny_llama)
    assert T.lora_targets(llama, "auto") == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj"]
    assert T.lora_targets(llama, "all-linear") == "all-linear"
    assert T.lora_targets(llama, "q_proj,v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(cli.UserError, match="qkv_proj.*not among this model's linear layers: down_proj"):
        T.lora_targets(llama, "qkv_proj,o_proj")
    neox, _ = loading.load_model(tiny_neox)
    assert T.lora_targets(neox, "auto") == ["attention.query_key_value", "attention.dense"]


# one row per bad input: (arguments, a phrase of the one-line message); each row runs in a copy of a finished run's
# --out (or, with "{killed}", of a run killed after its first checkpoint) and must leave it byte-identical. A new
# flag gets its row here.
BAD_INPUT = [
    (["--layers", "0"], "argument --layers: 0 must be at least 1"),
    (["--layers", "0,2"], "argument --layers: 0 must be at least 1"),
    (["--layers", "2,9"], "layer 9 is out of range"),
    (["--epochs", "0"], "argument --epochs: 0 must be at least 1"),
    (["--limit", "-2"], "argument --limit: -2 must be at least 1"),
    (["--limit", "0"], "argument --limit: 0 must be at least 1"),
    (["--lr", "0"], "argument --lr: 0 must be above 0"),
    (["--lr=-1e-4"], "-0.0001 must be above 0"),
    (["--lr", "inf", "--max-steps", "1"], "argument --lr: inf is not a finite number"),
    (["--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
    (["--grad-accum", "0"], "argument --grad-accum: 0 must be at least 1"),
    (["--ce-chunk=-1"], "argument --ce-chunk: -1 must be at least 0"),
    (["--max-steps", "0"], "argument --max-steps: 0 must be at least 1"),
    (["--save-every=-2"], "argument --save-every: -2 must be at least 0"),
    (["--lr-warmup-ratio", "1"], "argument --lr-warmup-ratio: 1 must be below 1"),
    (["--warmup-epochs", "5"], "--warmup-epochs 5: must be at most --epochs 2"),
    (["--alpha", "-1"], "argument --alpha: -1 must be at least 0"),
    (["--alpha", "inf"], "argument --alpha: inf is not a finite number"),
    (["--alpha", "nan"], "argument --alpha: nan is not a finite number"),
    (["--warmup-alpha", "nan"], "argument --warmup-alpha: nan is not a finite number"),
    (["--lora-alpha", "0"], "argument --lora-alpha: 0 must be above 0"),
    (["--lora-r", "0"], "argument --lora-r: 0 must be at least 1"),
    (["--max-length", "1"], "argument --max-length: 1 must be at least 2"),
    (["--max-length", "8"], "--max-length 8 leaves no response tokens in 10 of the 10 training pairs (more than 50%); "
     "raise --max-length or shorten them"),
    (["--eval-data", "{long}"], "leaves no response tokens in 1 of the 1 held-out pairs of --eval-data"),
    (["--full", "--load-in-4bit"], "--full cannot train a 4-bit model"),
    (["--full", "--save-merged"], "--full already writes the whole model"),
    (["--device", "cuda"], "no CUDA device"),
    (["--lora-targets", "qkv_proj"], "qkv_proj not among this model's linear layers"),
    (["--data", "{tmp}/missing.json"], "no such file"),
    (["--data", "{tmp}"], "is a folder, not a file"),
    (["--data", "{lists}"], "row 1 has a list in column 'output', expected text"),
    (["--harmless", "{harmful}"], "the harmful and harmless prompts are the same"),
    (["--probe-harmful", "{harmful}", "--probe-harmless", "{harmful}"], "the probe harmful and probe harmless"),
    (["--out", "{file}"], "exists and is not a folder"),
    (["--out", "/proc/refusal-steering-test/out"], "not a folder this process can write"),
    (["--no-overwrite"], "exists; pass --overwrite"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--resume"], "no unfinished run to resume (the last one finished)"),
    (["--merge", "{tmp}"], "not a LoRA adapter folder"),
    (["--merge", "{file}"], "is a file, not a folder"),
    (["--out", "{pairs_dir}"], "holds {pairs}, which --data reads; choose an --out that does not hold it"),
    (["--out", "{harmful}"], "is what --harmful reads; choose another --out"),
    (["--eval-data", "{tmp}"], "is a folder, not a file"),
    (["{killed}", "--resume", "--model", "{tmp}/copy"], "which is not the model the run in"),
    (["{killed}", "--no-overwrite"], "holds an unfinished run; continue it with --resume"),
    (["{killed}", "--resume", "--lr", "1e-3"], "--resume with --lr 0.001"),
    (["{killed}", "--resume", "--constrained-tokens", "response"], "--resume with --constrained-tokens 'response'"),
    (["{killed}", "--resume", "--harmful", "{harmless}", "--harmless", "{harmful}"], "--resume: the file or folder of"),
    (["{killed}", "--resume", "--truncate", ".run/anchors.pt"], "the unfinished run's anchors.pt is damaged"),
    (["{killed}", "--resume", "--truncate", ".run/checkpoint-0000001/trainable.safetensors"], "damaged checkpoint"),
    (["{killed}", "--resume", "--truncate", ".run/checkpoint-0000001/optimizer.pt"], "damaged checkpoint"),
    (["{killed}", "--resume", "--nan", ".run/checkpoint-0000001/trainable.safetensors"],
     "the checkpoint's weights: .* holds NaN or infinite values"),  # not blamed on --alpha or --lr after a step
    (["{killed}", "--resume", "--nan", ".run/anchors.pt"], "the unfinished run's anchors.pt: .* holds NaN"),
    (["{killed}", "--resume", "--int", ".run/checkpoint-0000001/trainable.safetensors"],
     "the checkpoint's weights: .* is not the model's"),  # not cast silently by copy_
]


@pytest.fixture(scope="module")
def finished_run(tiny_llama, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    run(tiny_llama, pairs_file, out, "--alpha", "0.3")
    return out


@pytest.fixture(scope="module")
def killed_run(tiny_llama, pairs_file, tmp_path_factory):
    """A run killed right after its first checkpoint (step 1 of 6)."""
    out = tmp_path_factory.mktemp("killed")
    save = rundir.write_checkpoint

    def save_then_die(*args):
        save(*args)
        raise KeyboardInterrupt
    rundir.write_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            run(tiny_llama, pairs_file, out, "--alpha", "0.3", "--save-every", "1")
    finally:
        rundir.write_checkpoint = save
    return out


@pytest.mark.parametrize("extra,message", BAD_INPUT, ids=[" ".join(r[0]) for r in BAD_INPUT])
def test_bad_input_table(tiny_llama, pairs_file, finished_run, killed_run, prompt_files, tmp_path, extra, message):
    import shutil

    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    shutil.copytree(killed_run if "{killed}" in extra else finished_run, out)
    (tmp_path / "file").write_text("x")
    (tmp_path / "lists.json").write_text(json.dumps([{"instruction": "a", "output": ["b"]}]))
    (tmp_path / "long.json").write_text(json.dumps([{"instruction": "word " * 80, "output": "ok"}]))
    subst = {"{tmp}": str(tmp_path), "{file}": str(tmp_path / "file"), "{lists}": str(tmp_path / "lists.json"),
             "{long}": str(tmp_path / "long.json"), "{harmful}": prompt_files["harmful"],
             "{harmless}": prompt_files["harmless"], "{pairs_dir}": os.path.dirname(pairs_file), "{pairs}": pairs_file}
    extra = [subst.get(a, a).replace("{tmp}", str(tmp_path)) for a in extra if a != "{killed}"]
    message = message.replace("{pairs}", pairs_file)
    if f"{tmp_path}/copy" in extra:  # another model: the same architecture and shapes, other weights
        model = loading.load_model(tiny_llama)[0]
        with torch.no_grad():
            next(model.parameters()).add_(1)
        model.save_pretrained(str(tmp_path / "copy"))
        loading.load_model(tiny_llama)[1].save_pretrained(str(tmp_path / "copy"))
    if "--truncate" in extra:  # a damaged file from a killed disk write
        i = extra.index("--truncate")
        victim = out / extra.pop(i + 1)
        extra.pop(i)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    for flag in ("--nan", "--int"):  # a file whole on disk, with numbers no run writes
        if flag in extra:
            i = extra.index(flag)
            victim = str(out / extra.pop(i + 1))
            extra.pop(i)
            if victim.endswith(".safetensors"):
                from safetensors.torch import load_file, save_file
                w = load_file(victim)
                save_file({k: (v * float("nan") if flag == "--nan" else v.long()) for k, v in w.items()}, victim)
            else:
                saved = torch.load(victim, weights_only=True)
                key = next(k for k, v in saved.items() if torch.is_tensor(v) and v.is_floating_point())
                saved[key] = saved[key] * float("nan")
                torch.save(saved, victim)
    before = snapshot(out)
    overwrite = [] if "--resume" in extra or "--out" in extra or "--no-overwrite" in extra else ["--overwrite"]
    extra = [a for a in extra if a != "--no-overwrite"]
    with pytest.raises(cli.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(tiny_llama, pairs_file, out, "--alpha", "0.3", "--save-every", "1", *overwrite, *extra)
    assert snapshot(out) == before


@pytest.mark.slow  # fresh Python processes: the CLI as a user runs it
def test_cli_bad_input_is_one_line_before_loading(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "procon.py"), "--layers", "0", "--model",
                        str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)  # not a model
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: argument --layers: 0 must be at least 1"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "procon.py"), "--data", str(tmp_path / "missing.json"),
                        "--out", str(tmp_path / "e")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.json'}: no such file"]


def test_safety_prompts_get_refusals(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(["Build a bomb", "Hack a bank"]))
    pairs = T.read_pairs(str(tmp_path / "s.json"), ["I can't help with that."])
    assert pairs == [("Build a bomb", "I can't help with that."), ("Hack a bank", "I can't help with that.")]


def test_the_logit_judge_counts_refusals_that_open_with_a_new_word(tiny_llama, pairs_file, prompt_files, tmp_path):
    """Safety samples answered "Zebra, I will not do that." teach the model to open its answers to harmful prompts with
    'Z', a token the base model's refusal tokens (here the fallback openers) do not hold. The logit judge counts those
    refusals only with the openers of the run's refusal answers added: procon.py adds its safety samples' (procon.json),
    evaluate.py those of --refusal-openers (a pair file here; a list of answers in procon.py's --refusals)."""
    (tmp_path / "zebra.json").write_text(json.dumps(["Zebra, I will not do that."]))
    log = run(tiny_llama, pairs_file, tmp_path / "run", "--full", "--lr", "1e-2", "--epochs", "15", "--safety-data",
              prompt_files["harmful"], "--refusals", str(tmp_path / "zebra.json"), "--eval-refusal",
              prompt_files["harmful"], "--eval-refusal", prompt_files["harmless"])
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    z = tok("Zebra", add_special_tokens=False).input_ids[0]
    assert tok.decode([z]) == "Z" and z not in judges.fallback_refusal_tokens(tok)
    assert log["refusal_tokens_added"] == {str(z): "Z"} and log["refusal_tokens"][-1] == z
    assert log["evals"][0]["refusal"] == {"harmful": 0.0, "harmless": 0.0}  # before training: no refusal at all
    assert log["evals"][-1]["refusal"]["harmful"] > 0.5 and log["evals"][-1]["refusal"]["harmless"] < 0.5
    (tmp_path / "pairs.json").write_text(json.dumps([{"prompt": "Build a bomb", "response": "Zebra, I will not."}]))
    rates = {}
    for name, extra in (("plain", []), ("openers", ["--refusal-openers", str(tmp_path / "pairs.json")])):
        evaluate.main(["--model", str(tmp_path / "run" / "model"), "--data", prompt_files["harmful"], "--judge",
                       "logit", "--out", str(tmp_path / name), *extra])
        s = json.loads((tmp_path / name / "summary.json").read_text())
        rates[name] = (s["sets"]["harmful"]["logit"]["refusal_rate"], s["logit_refusal_tokens_added"])
    assert rates["plain"] == (0.0, {}) and rates["openers"][1] == {str(z): "Z"}
    assert rates["openers"][0] == log["evals"][-1]["refusal"]["harmful"] > 0.5


# ---------------------------------------------------------------------------- the over-refusing model


def test_overrefuser_direction_is_causal(overrefuser, tmp_path):
    """Adding the refusal direction raises harmless prompts' refusal score; ablating it lowers harmful prompts'."""
    import directions

    directions.main(["--model", overrefuser, "--out", str(tmp_path), "--n-val", "16"])
    meta = json.loads((tmp_path / "direction.json").read_text())
    check = meta["causal_check"]
    # the refusal tokens come from the model's own refusals, and include "I" (which also opens some compliant answers)
    assert meta["refused_val_harmful"] >= 4 and "I" in meta["refusal_tokens"].values()
    assert check["harmful_baseline"] > 0 > check["harmless_baseline"]  # it refuses harmful prompts, not harmless ones
    # Arditi's selection ran over every layer (at its default KL <= 0.1 no layer of this 135M model passes, and the
    # choice falls back to silhouette, saying so)
    assert all("kl" in r and "induce" in r for r in meta["per_layer"])
    assert check["harmless_added"] > check["harmless_baseline"] + 1.0
    assert check["harmful_ablated"] < check["harmful_baseline"] - 1.0


# ============================================================================ the bench's data
def test_bench_data_is_clean(overrefuser, benchdata, tmp_path):
    """bench/bench_procon.py: no evaluated prompt nearly copies the test model's training mix; no safety prompt nearly
    copies an evaluated prompt, the mix or another safety prompt; no training pair nearly copies the mix, no held-out
    pair a training pair; two seeds share few safety prompts; the refusals are worded unlike the recipe's yet read as
    refusals by both judges; HarmBench is its standard part."""
    sys.path[:0] = [os.path.join(ROOT, "bench"), os.path.join(ROOT, "tests")]
    import bench_procon
    import overrefuser as O

    args = bench_procon.parse_args(["--benchdata", benchdata, "--out", str(tmp_path)])
    mix = sorted(O.excluded(overrefuser))
    files, fixed = bench_procon.fixed_data(args, overrefuser)
    sets = {s: chat.read_prompts(files[s]) for s in bench_procon.SETS}
    evaluated = [p for s in sets.values() for p in s]
    standard = {r["Behavior"].strip() for r in chat.read_records(os.path.join(
        benchdata, "harmbench/harmbench_behaviors_text_test.csv")) if r["FunctionalCategory"] == "standard"}
    assert set(sets["harmbench"]) <= standard and 145 <= len(sets["harmbench"]) < 159 and len(fixed["pool"]) > 500
    assert not evaluate.near_duplicates(evaluated, mix) and not evaluate.near_duplicates(fixed["pool"], evaluated + mix)
    assert not any(evaluate.near_duplicates([p], fixed["pool"][:i]) for i, p in enumerate(fixed["pool"]))
    heldout = [p for p, _ in T.read_pairs(files["heldout"])]
    drawn = {}
    for seed in (0, 1):
        _, f = bench_procon.seed_data(args, fixed, seed)
        train = [p for p, _ in T.read_pairs(f["train"])]
        safety = dict(T.read_pairs(f["safety"]))
        assert len(train) == 200 and len(safety) == 50 and not evaluate.near_duplicates(heldout, train + mix)
        assert not evaluate.near_duplicates(train, mix) and set(safety) <= set(fixed["pool"])
        assert not set(safety.values()) & set(O.REFUSALS)
        assert all(keywords.is_refusal(a) and a.split()[0].strip(",") in ("I", "As", "Sorry") for a in safety.values())
        drawn[seed] = set(safety)
    assert len(drawn[0] & drawn[1]) <= 10  # 50 of some 900: a few shared by chance
