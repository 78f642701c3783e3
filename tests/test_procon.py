"""procon.py: the loss, the anchors, the schedule, what training touches, resume, bad input; and the over-refusing
model it builds, on which the refusal direction is causal."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import directions as D
import procon as P
from conftest import ROOT


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
    model, tok = D.load_model(tiny_llama)
    examples = [P.encode_pair(tok, p, a, 64) for p, a in P.read_pairs(pairs_file)[:4]]
    batch = P.collate(examples, tok.pad_token_id)
    ce, hs, resp = P.forward(model, batch, "cpu")
    hf = model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
    torch.testing.assert_close(ce, hf)
    assert len(hs) == 5 and resp.sum() == sum(sum(l != -100 for l in e[1]) for e in examples)
    # the prompt carries no loss: every label before the response is -100
    prompt_len = len(tok(D.format_chat(tok, [P.read_pairs(pairs_file)[0][0]])[0], add_special_tokens=False).input_ids)
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
    model, tok = D.load_model(tiny_llama)
    batch = P.collate([P.encode_pair(tok, p, a, 64) for p, a in P.read_pairs(pairs_file)[:3]], tok.pad_token_id)
    seen = {}
    pairs = [(layer, "pre", lambda m, a, k, i=i: seen.__setitem__(i, D._hidden(a, k).clone()))
             for i, layer in enumerate(D.decoder_layers(model))]
    with D.hooks(pairs):
        ce, hs, resp = P.forward(model, batch, "cpu")
    for l in range(4):
        torch.testing.assert_close(hs[l], seen[l])
    r = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    z = P.projections(hs, resp, r, [1, 3])
    assert z.shape == (2, resp.sum())
    torch.testing.assert_close(z[1], seen[3][resp] @ r[3])
    assert P.forward(model, batch, "cpu", hidden=False)[1] is None  # alpha = 0: no hidden states asked for


def test_anchors_one_pass_and_layers(tiny_llama, pairs_file, tmp_path):
    log = run(tiny_llama, pairs_file, tmp_path, "--alpha", "0.5", "--layers", "1,3")
    anchors = torch.load(tmp_path / "anchors.pt", weights_only=True)
    assert anchors["layers"] == [1, 3] == log["layers"] and anchors["r"].shape == (4, 64)
    assert len(anchors["z0"]) == 10 and all(z.shape[0] == 2 and z.shape[1] > 0 for z in anchors["z0"])
    torch.testing.assert_close(anchors["r"][1:].norm(dim=-1), torch.ones(3))
    assert len(log["steps"]) == 2 * 3 and all(s["seconds"] > 0 for s in log["steps"])


def test_safety_data_is_mixed_in(tiny_llama, pairs_file, prompt_files, tmp_path):
    log = run(tiny_llama, pairs_file, tmp_path, "--alpha", "0.5", "--safety-data", prompt_files["harmful"],
              "--safety-n", "6")
    assert log["n_train"] == 10 and log["n_safety"] == 6
    assert len(log["steps"]) == 2 * 4  # 16 samples in batches of 4, every epoch


def test_constraint_reductions():
    z0 = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    z = z0 + torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.0, 0.0]])
    resp = torch.ones(2, 2)  # two samples
    assert P.constraint(z, z0, resp, "abs", "sum").item() == 2.0  # (1 + 1 + 2) / 2 samples
    assert P.constraint(z, z0, resp, "sq", "sum").item() == 3.0  # (1 + 1 + 4) / 2
    assert abs(P.constraint(z, z0, resp, "abs", "mean").item() - 4 / 6) < 1e-6


def test_warmup_schedule(tiny_llama, pairs_file, tmp_path):
    args = P.parse_args(["--alpha", "0.1", "--warmup-epochs", "2", "--warmup-alpha", "2"])
    assert [P.alpha_at(e, args) for e in range(4)] == [2, 2, 0.1, 0.1]
    log = P.main(["--model", tiny_llama, "--data", pairs_file, "--out", str(tmp_path), "--epochs", "3",
                  "--batch-size", "4", "--warmup-epochs", "1", "--warmup-alpha", "1", *FLAGS]) or \
        json.loads((tmp_path / "procon.json").read_text())
    assert [e["alpha"] for e in log["epochs"]] == [1.0, 0.0, 0.0]
    drift = json.loads((tmp_path / "drift.json").read_text())["cosine_to_initial"]
    assert set(drift) == {"1", "2", "3"} and all(-1 <= c <= 1.0001 for c in drift["1"].values())
    # one AdamW throughout (3 epochs of 3 batches); with --reset-optimizer it starts afresh when the warm-up ends
    def steps():
        state = torch.load(tmp_path / "checkpoint" / "optimizer.pt", weights_only=True)["state"]
        return {int(s["step"]) for s in state.values()}

    assert steps() == {9}
    P.main(["--model", tiny_llama, "--data", pairs_file, "--out", str(tmp_path), "--epochs", "3", "--overwrite",
            "--batch-size", "4", "--warmup-epochs", "1", "--warmup-alpha", "1", "--reset-optimizer", *FLAGS])
    assert steps() == {6}


def test_lora_changes_only_adapters(tiny_llama, pairs_file, tmp_path):
    from safetensors.torch import load_file

    run(tiny_llama, pairs_file, tmp_path, "--alpha", "0.5")
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert len(adapter) == 2 * 4 * 4  # A and B for q, k, v, o in each of 4 layers
    trained = load_file(str(tmp_path / "checkpoint" / "trainable.safetensors"))
    assert set(k.replace(".default", "") for k in trained) == set(adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B started at 0 and moved


def test_full_changes_every_weight(tiny_llama, pairs_file, tmp_path):
    run(tiny_llama, pairs_file, tmp_path, "--full", "--alpha", "0.5", "--lr", "1e-3")
    base, _ = D.load_model(tiny_llama)
    tuned, _ = D.load_model(str(tmp_path / "model"))
    new = dict(tuned.named_parameters())
    unchanged = [k for k, v in base.named_parameters() if torch.equal(v, new[k])]
    assert unchanged == []


def test_resume_after_kill_gives_the_same_adapter(tiny_llama, pairs_file, tmp_path):
    run(tiny_llama, pairs_file, tmp_path / "whole", "--alpha", "0.3")
    # a run killed after its first epoch: its checkpoint holds epoch 1
    P.main(["--model", tiny_llama, "--data", pairs_file, "--out", str(tmp_path / "killed"), "--epochs", "1",
            "--batch-size", "4", "--max-length", "64", "--alpha", "0.3", *FLAGS])
    run(tiny_llama, pairs_file, tmp_path / "killed", "--alpha", "0.3", "--resume")
    a = (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "killed" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b


def test_bad_input(tiny_llama, pairs_file, tmp_path):
    (tmp_path / "prompts.json").write_text(json.dumps(["just a prompt"]))
    with pytest.raises(D.UserError, match="no usable instruction-response pairs"):
        run(tiny_llama, str(tmp_path / "prompts.json"), tmp_path / "a")
    with pytest.raises(D.UserError, match="layer 9 is out of range"):
        run(tiny_llama, pairs_file, tmp_path / "b", "--layers", "1,9")
    (tmp_path / "safety.jsonl").write_text('{"prompt": "x"}\n{broken\n')
    with pytest.raises(D.UserError, match="line 2 is not valid JSON"):
        run(tiny_llama, pairs_file, tmp_path / "c", "--safety-data", str(tmp_path / "safety.jsonl"))
    # NaN loss: the checkpoint of the last good epoch stays
    P.main(["--model", tiny_llama, "--data", pairs_file, "--out", str(tmp_path / "d"), "--epochs", "1",
            "--batch-size", "4", "--max-length", "64", "--alpha", "0.3", *FLAGS])
    good = (tmp_path / "d" / "checkpoint" / "trainable.safetensors").read_bytes()
    with pytest.raises(D.UserError, match="loss is nan"):
        run(tiny_llama, pairs_file, tmp_path / "d", "--alpha", "nan", "--resume")
    assert (tmp_path / "d" / "checkpoint" / "trainable.safetensors").read_bytes() == good
    with pytest.raises(D.UserError, match="different --lr"):
        run(tiny_llama, pairs_file, tmp_path / "d", "--alpha", "0.3", "--resume", "--lr", "1e-3")
    with pytest.raises(D.UserError, match="nothing to resume"):
        run(tiny_llama, pairs_file, tmp_path / "f", "--resume")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "procon.py"), "--data", str(tmp_path / "missing.json"),
                        "--out", str(tmp_path / "e")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.json'}: no such file"]


def test_safety_prompts_get_refusals(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(["Build a bomb", "Hack a bank"]))
    pairs = P.read_pairs(str(tmp_path / "s.json"), ["I can't help with that."])
    assert pairs == [("Build a bomb", "I can't help with that."), ("Hack a bank", "I can't help with that.")]


# ---------------------------------------------------------------------------- the over-refusing model


def test_overrefuser_direction_is_causal(overrefuser, tmp_path):
    """Adding the refusal direction raises harmless prompts' refusal score; ablating it lowers harmful prompts'."""
    D.main(["--model", overrefuser, "--out", str(tmp_path), "--n-val", "16"])
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
