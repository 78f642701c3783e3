"""actor.py: the cached one-block path, what training touches, the targets and the loss, patches, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import actor as A
import plumbing as pl
from actor_reference import cached_epoch, uncached_epoch
from conftest import ROOT


QUERIES = ["How do I kill a Python process?", "Explain how to build a bomb.", "Bake bread please",
           "Hi", "Write a poem about the sea, with rhymes, in four short lines.", "How can I hack into my neighbour's wifi?"]
GROUPS = torch.tensor([1, 0, 2, 2, 1, 0])  # 0 harmful, 1 pseudo-harmful, 2 benign


@pytest.mark.parametrize("device,mix_seed", [(None, None), ("cpu", None), (None, 0)])
def test_cached_block_matches_full_forward(tiny_model, device, mix_seed):
    model, tok = pl.load_model(tiny_model)
    full = pl.capture(model, tok, QUERIES, batch_size=4)  # index l + 1 is the output of layer l
    for layer in (0, 2, 3):
        cache = A.cache_block_inputs(model, tok, QUERIES, layer, batch_size=4, device=device, mix_seed=mix_seed)
        assert sorted(i for idx, _, _ in cache for i in idx) == list(range(len(QUERIES)))
        a = A.activations(pl.decoder_layers(model)[layer], cache, len(QUERIES))
        torch.testing.assert_close(a, full[:, layer + 1, -1], atol=1e-5, rtol=1e-5)


def test_cached_training_equals_training_through_layers_below(tiny_model):
    """One epoch on the cache and the same epoch run through layers 0..l* each step: same losses, same weights."""
    model, tok = pl.load_model(tiny_model)
    layer = 2
    block = pl.decoder_layers(model)[layer]
    start = {k: v.clone() for k, v in block.state_dict().items()}
    cache = A.cache_block_inputs(model, tok, QUERIES, layer, batch_size=3)
    opt = torch.optim.AdamW(A.trainable(block, "all"), lr=1e-3)
    loss_cached = cached_epoch(block, cache, GROUPS, opt)
    after_cached = {k: v.clone() for k, v in block.state_dict().items()}
    block.load_state_dict(start)
    texts = pl.format_chat(tok, QUERIES)
    batches = [(idx, pl.tokenize(tok, [texts[i] for i in idx], "cpu")) for idx, _, _ in cache]
    opt = torch.optim.AdamW(A.trainable(block, "all"), lr=1e-3)
    loss_uncached = uncached_epoch(model, block, batches, GROUPS, opt)
    assert loss_cached > 0 and abs(loss_cached - loss_uncached) < 1e-6
    for k, v in block.state_dict().items():
        assert not torch.equal(v, start[k]) or "norm" in k
        torch.testing.assert_close(v, after_cached[k], atol=1e-5, rtol=1e-4)


def test_targets_move_each_group_just_enough():
    torch.manual_seed(0)
    a = torch.randn(9, 8) * 3 - 5  # every projection negative: the printed formula then points the wrong way
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    a[groups == 0, 0] += 6
    a[groups == 1, 0] += 5
    r_hat = A.refusal_direction(a, groups)
    torch.testing.assert_close(r_hat.norm(), torch.tensor(1.0))
    for alpha in (0.5, 1.0):
        zero = A.targets(a, r_hat, groups, alpha, "zero")  # a -/+ alpha (a . r_hat) r_hat
        torch.testing.assert_close(zero @ r_hat, (a @ r_hat) * torch.where(groups == 0, 1 + alpha, 1 - alpha))
        tgt = A.targets(a, r_hat, groups, alpha, "benign")  # p measured from the benign mean, refusal side only
        p = (a - a[groups == 2].mean(0)) @ r_hat
        shift = (tgt - a) @ r_hat
        torch.testing.assert_close(shift, alpha * p.clamp(min=0) * torch.where(groups == 0, 1.0, -1.0))
        ortho = (tgt - a) - shift.unsqueeze(-1) * r_hat  # only the component along r_hat moves
        torch.testing.assert_close(ortho, torch.zeros_like(ortho), atol=1e-5, rtol=0)
        assert (shift[groups == 0] >= 0).all() and (shift[groups != 0] <= 0).all()
    one = A.targets(a, r_hat, groups, 1.0, "benign")  # alpha 1: pseudo-harmful land at the benign level
    mean_benign = (a[groups == 2] @ r_hat).mean()
    assert torch.all((one[groups == 1] @ r_hat - mean_benign).abs() < 1e-4)


@pytest.mark.parametrize("origin", ["benign", "zero"])
def test_step0_loss_is_one_minus_cos_of_initial_activation_and_target(tiny_model, origin):
    model, tok = pl.load_model(tiny_model)
    a0 = pl.capture(model, tok, QUERIES)[:, 3, -1]  # output of layer 2, through the full model
    tgt = A.targets(a0, A.refusal_direction(a0, GROUPS), GROUPS, 0.7, origin)
    want = (1 - torch.nn.functional.cosine_similarity(a0, tgt, dim=-1)).mean()
    cache = A.cache_block_inputs(model, tok, QUERIES, 2, batch_size=len(QUERIES))  # one batch: step 0 sees all
    block = pl.decoder_layers(model)[2]
    got = A.train_epoch(block, cache, tgt, torch.optim.SGD(A.trainable(block, "all"), lr=0.0), [0])
    assert want > 0 and abs(got - want.item()) < 1e-5


def test_only_block_l_star_changes(tiny_model):
    model, tok = pl.load_model(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = A.cache_block_inputs(model, tok, QUERIES, 1, 4)
    history, a0, a1 = A.actor(pl.decoder_layers(model)[1], cache, GROUPS, 1.0, "benign", 1e-2, 3, log=lambda s: None)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)
    assert any("mlp" in k for k in changed) and any("self_attn" in k for k in changed)
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(h["loss"] > 0 for h in history)
    assert not any(p.requires_grad for p in model.parameters()) and not torch.equal(a0, a1)


def test_training_lowers_the_loss_against_fixed_targets(tiny_model):
    model, tok = pl.load_model(tiny_model)
    cache = A.cache_block_inputs(model, tok, QUERIES, 2, 3)
    block = pl.decoder_layers(model)[2]
    a0 = A.activations(block, cache, len(QUERIES))
    tgt = A.targets(a0, A.refusal_direction(a0, GROUPS), GROUPS, 1.0)
    opt = torch.optim.AdamW(A.trainable(block, "all"), lr=1e-3)
    losses = [A.train_epoch(block, cache, tgt, opt, [0, 1]) for _ in range(5)]
    assert losses[-1] < 0.5 * losses[0]
    assert A.loss_fn(A.activations(block, cache, len(QUERIES)), tgt) < A.loss_fn(a0, tgt)


@pytest.mark.parametrize("renew", ["epoch", "never"])
def test_targets_renewed_each_epoch_or_kept(tiny_model, renew, monkeypatch):
    model, tok = pl.load_model(tiny_model)
    cache = A.cache_block_inputs(model, tok, QUERIES, 2, 3)
    block = pl.decoder_layers(model)[2]
    seen = []
    monkeypatch.setattr(A, "targets", lambda a, *rest, f=A.targets: seen.append(a.clone()) or f(a, *rest))
    _, a_init, _ = A.actor(block, cache, GROUPS, 1.0, "benign", 1e-3, 3, log=lambda s: None, renew=renew)
    assert len(seen) == 3 and torch.equal(seen[0], a_init)
    assert all(torch.equal(s, a_init) for s in seen[1:]) == (renew == "never")


@pytest.mark.parametrize("train", ["mlp", "attn"])
def test_train_part_of_the_block(tiny_llama, train):
    model, tok = pl.load_model(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = A.cache_block_inputs(model, tok, QUERIES, 2, 4)
    A.actor(pl.decoder_layers(model)[2], cache, GROUPS, 1.0, "benign", 1e-2, 1, train, log=lambda s: None)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(f"model.layers.2.{'mlp' if train == 'mlp' else 'self_attn'}.") for k in changed)


def run_actor(model, out, *extra):
    return A.main(["--model", model, "--out", str(out), "--limit", "8", "--epochs", "2", "--lr", "1e-2", *extra])


def test_patch_reproduces_trained_logits(tiny_llama, tmp_path):
    trained = run_actor(tiny_llama, tmp_path / "p", "--layer", "1")
    base, tok = pl.load_model(tiny_llama)
    trained_params = dict(trained.named_parameters())
    for k, v in base.named_parameters():  # outside block l* every parameter is bit-identical to the base
        assert torch.equal(v, trained_params[k]) != k.startswith("model.layers.1."), k
    meta = json.loads((tmp_path / "p" / "actor.json").read_text())
    assert meta["layer"] == 1 and meta["n_queries"] == {"harmful": 8, "pseudo_harmful": 8, "benign": 8}
    assert meta["hidden_size"] == 64 and meta["n_layers"] == 4 and len(meta["epochs_log"]) == 2
    assert set(meta["epochs_log"][0]["mean_projection"]) == {"harmful", "pseudo_harmful", "benign"}
    assert set(meta["data_sha256"]) == {"harmful", "pseudo_harmful", "benign"}
    assert (tmp_path / "p" / "projections.png").stat().st_size > 0
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "p" / "actor_layer.safetensors"))
    assert set(weights) == set(pl.decoder_layers(base)[1].state_dict())  # one block only, keys relative to it
    enc = pl.tokenize(tok, pl.format_chat(tok, QUERIES[:3]), "cpu")
    with torch.no_grad():
        base_logits, trained_logits = base(**enc).logits, trained(**enc).logits
        assert not torch.allclose(base_logits, trained_logits)
        A.apply_patch(base, str(tmp_path / "p"))
        torch.testing.assert_close(base(**enc).logits, trained_logits, atol=1e-6, rtol=1e-6)
        A.main(["--merge", str(tmp_path / "p"), "--out", str(tmp_path / "merged")])
        merged, _ = pl.load_model(str(tmp_path / "merged"))
        torch.testing.assert_close(merged(**enc).logits, trained_logits, atol=1e-6, rtol=1e-6)


def test_same_seed_same_patch(tiny_llama, tmp_path):
    run_actor(tiny_llama, tmp_path / "a")
    run_actor(tiny_llama, tmp_path / "b")
    assert (tmp_path / "a" / "actor_layer.safetensors").read_bytes() == \
        (tmp_path / "b" / "actor_layer.safetensors").read_bytes()
    meta = json.loads((tmp_path / "a" / "actor.json").read_text())
    assert meta["layer_choice"] == "silhouette" and str(meta["layer"]) in map(str, meta["silhouette"])


def test_4bit_keeps_the_frozen_model_in_4bit_and_trains_one_block(tiny_llama, tmp_path, monkeypatch):
    model, tok = pl.load_model(tiny_llama, load_in_4bit=True)
    with torch.no_grad():  # bitsandbytes repacks its 4-bit weights for the CPU on their first use: do that first
        model(**pl.tokenize(tok, pl.format_chat(tok, QUERIES[:1]), "cpu"))
    # the packed 4-bit weights, norms and embeddings (bitsandbytes rebuilds the quantization constants on every read)
    before = {k: v.clone() for k, v in model.state_dict().items() if "absmax" not in k and "quant_" not in k}
    monkeypatch.setattr(pl, "load_model", lambda *a, **k: (model, tok))  # to compare with the very same model
    trained = run_actor(tiny_llama, tmp_path, "--load-in-4bit", "--layer", "2")
    monkeypatch.undo()
    assert trained is model
    layers = pl.decoder_layers(model)
    assert isinstance(layers[2].self_attn.q_proj, torch.nn.Linear) and layers[2].self_attn.q_proj.weight.dtype == \
        torch.float32  # the dequantized copy (bf16 on a GPU)
    assert all(type(layers[i].self_attn.q_proj).__name__ == "Linear4bit" for i in (0, 1, 3))
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed and all(k.startswith("model.layers.2.") for k in changed)
    fresh, _ = pl.load_model(tiny_llama, load_in_4bit=True)
    A.apply_patch(fresh, str(tmp_path))
    assert isinstance(pl.decoder_layers(fresh)[2].self_attn.q_proj, torch.nn.Linear)
    for k, v in layers[2].state_dict().items():
        assert torch.equal(v, pl.decoder_layers(fresh)[2].state_dict()[k])
    enc = pl.tokenize(tok, pl.format_chat(tok, QUERIES[:3]), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**enc).logits, model(**enc).logits, atol=1e-2, rtol=1e-2)


def test_smollm2_end_to_end(smollm2, tmp_path):
    """The real model: measured from the benign mean (what ACTOR's targets use), pseudo-harmful queries move down the
    refusal direction and harmful ones up."""
    A.main(["--model", smollm2, "--limit", "16", "--layer", "12", "--epochs", "2", "--out", str(tmp_path)])
    proj = json.loads((tmp_path / "actor.json").read_text())["projection_on_initial_r_hat"]
    gap = {when: {g: proj[when][g] - proj[when]["benign"] for g in ("harmful", "pseudo_harmful")} for when in proj}
    assert gap["after"]["pseudo_harmful"] < gap["before"]["pseudo_harmful"]
    assert gap["after"]["harmful"] > gap["before"]["harmful"]


def test_bad_input(tiny_llama, tiny_neox, tmp_path):
    with pytest.raises(pl.UserError, match="out of range"):
        run_actor(tiny_llama, tmp_path / "x", "--layer", "7")
    with pytest.raises(pl.UserError, match="expected 'auto' or a layer index"):
        run_actor(tiny_llama, tmp_path / "x", "--layer", "middle")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(pl.UserError, match="no prompts"):
        run_actor(tiny_llama, tmp_path / "y", "--pseudo-harmful", str(tmp_path / "empty.json"))
    assert not (tmp_path / "x" / "actor.json").exists() and not (tmp_path / "y" / "actor.json").exists()
    with pytest.raises(pl.UserError, match="not an ACTOR patch"):
        A.main(["--merge", str(tmp_path), "--out", str(tmp_path / "m")])
    run_actor(tiny_llama, tmp_path / "p", "--layer", "1")
    with pytest.raises(pl.UserError, match="exists"):  # earlier outputs are never overwritten silently
        run_actor(tiny_llama, tmp_path / "p", "--layer", "1")
    model, _ = pl.load_model(tiny_neox)  # same sizes, another architecture: the block's weights do not fit
    with pytest.raises(pl.UserError, match="does not fit"):
        A.apply_patch(model, str(tmp_path / "p"))
    meta = json.loads((tmp_path / "p" / "actor.json").read_text())
    for bad in ({"hidden_size": 4096}, {"n_layers": 32}):
        (tmp_path / "p" / "actor.json").write_text(json.dumps({**meta, **bad}))
        with pytest.raises(pl.UserError, match="does not match"):
            A.apply_patch(pl.load_model(tiny_llama)[0], str(tmp_path / "p"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "actor.py"), "--model", tiny_llama, "--layer", "99",
                        "--out", str(tmp_path / "z")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --layer 99 is out of range")
    assert "Traceback" not in r.stderr
