"""What users run elsewhere and beyond one device: the refusal direction orthogonalised out of the weights (an ordinary
model equal to ablation by hooks), merged ACTOR patches and LoRA adapters equal to the patched and adapted models, a
model spread over the CPU and the disk (--device-map) giving the same results as the whole one, and procon.py in two
processes (torchrun) training what one process trains with --grad-accum 2."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, snapshot

import actor as A
import artifacts
import chat
import cli
import directions
import evaluate as E
import inference
import loading
import procon as P
import rundir
import runrecord
import training

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, in four lines.", "Hi"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def logits(model, tok, hook_pairs=()):
    enc = chat.tokenize(tok, chat.format_chat(tok, PROMPTS), loading.model_device(model))
    with torch.no_grad(), inference.hooks(hook_pairs):
        return model(**enc).logits.float()


def base_with_biases(path, folder):
    """A copy of a tiny model whose biases are random (they start at 0), so that the export's bias arithmetic counts."""
    model, tok = loading.load_model(path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder), model, tok


# ---------------------------------------------------------------- weight orthogonalisation (directions.py)
# The weights that write to the residual stream, per architecture ({i}: every layer), and the axis that indexes it.
WRITES = {"gpt_neox": ["gpt_neox.embed_in.weight", "gpt_neox.layers.{i}.attention.dense.weight",
                       "gpt_neox.layers.{i}.attention.dense.bias", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight",
                       "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias"],
          "qwen3_moe": ["model.embed_tokens.weight", "model.layers.{i}.self_attn.o_proj.weight",
                        "model.layers.{i}.mlp.experts.down_proj"]}  # [experts, d, in]: every expert's
DEFAULT_WRITES = ["model.embed_tokens.weight", "model.layers.{i}.self_attn.o_proj.weight",
                  "model.layers.{i}.mlp.down_proj.weight"]
POST_NORM = ("gemma2", "gemma3")  # a norm after each sublayer: refused


def axis_of(name):
    return 1 if "embed" in name or name.endswith("experts.down_proj") else 0


def test_ablated_weights_equal_ablation_by_hooks(arch_model, tmp_path):
    """On every architecture: the exported model's logits are those of the model with the direction ablated by hooks
    (max abs difference <= 1e-4, fp32); every weight that writes to the residual stream has r_hat^T W = 0 (<= 5e-6 of
    its largest entry) and every other weight is the model's own, bit for bit (a tied unembedding keeps its weights).
    Architectures that write through a norm after each sublayer are refused in one line, before any work."""
    arch, path = arch_model
    base, model, tok = base_with_biases(path, tmp_path / "base")
    r_hat = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(1)), dim=0)
    d = str(tmp_path / "direction.pt")
    artifacts.save_direction(d, r_hat, 2, -1, torch.zeros(4, 1, 64), [0], artifacts.record(base, model.config))
    out = tmp_path / "ablated"
    if arch in POST_NORM:
        with pytest.raises(cli.UserError, match="adds the output of a norm after each sublayer to the residual stream"):
            directions.main(["--model", base, "--ablate-weights", d, "--out", str(out)])
        with pytest.raises(cli.UserError, match="weights alone cannot ablate a direction there"):
            directions.main(["--model", base, "--save-ablated", "--out", str(out)])
        assert not out.exists()
        return
    want, original = logits(model, tok, E.ablation_hooks(model, r_hat)), model.state_dict()
    assert (want - logits(model, tok)).abs().max() > 1e-3  # the ablation changes something
    with pytest.raises(cli.UserError, match="pass --other-model"):  # a direction of another model
        directions.main(["--model", path, "--ablate-weights", d, "--out", str(out)])
    directions.main(["--model", base, "--ablate-weights", d, "--out", str(out)])
    exported, _ = loading.load_model(str(out))
    assert (logits(exported, tok) - want).abs().max() <= 1e-4
    written = {w.format(i=i) for w in WRITES.get(arch, DEFAULT_WRITES) for i in range(4)}
    meta = json.loads((out / directions.ABLATION_META).read_text())
    assert meta["orthogonalised"] == {n: axis_of(n) for n in meta["orthogonalised"]} and set(meta["orthogonalised"]) \
        == written and meta["direction_sha256"] == runrecord.sha256(d) and meta["model"] == base
    assert meta["residual_component"]["before"] > 0.05 and meta["residual_component"]["after"] < 1e-5
    state = exported.state_dict()
    assert set(state) >= set(original) and not exported.config.tie_word_embeddings
    for name, w in state.items():
        if name in written:
            assert (w.movedim(axis_of(name), -1) @ r_hat).abs().max() <= 5e-6 * w.abs().max()
            assert not torch.equal(w, original[name]), name
        else:
            assert torch.equal(w, original[name]), name  # lm_head of the tied Llama: the embedding as it was


def direction_file(path, base, model, harmless_mean=True):
    """A random unit direction at layer 2 of a tiny model (64 wide, 4 layers), with a random harmless mean or none
    (the file of an older directions.py)."""
    g = torch.Generator().manual_seed(1)
    r_hat = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    extra = {"harmless_mean": torch.randn(4, 1, 64, generator=g) + 3 * r_hat} if harmless_mean else {}
    artifacts.save_direction(str(path), r_hat, 2, -1, torch.zeros(4, 1, 64), [0], artifacts.record(base, model.config),
                             **extra)
    return str(path), r_hat, extra.get("harmless_mean")


def test_projected_direction_is_orthogonal_to_the_harmless_mean(tiny_llama, tmp_path):
    """--ablation projected removes n(r - (r.m)m), m the normalised harmless mean at the direction's layer: a unit
    vector orthogonal to m, in the plane of r and m, on r's side; the export's weights write nothing along it and
    ablation.json records the variant. A direction file without the harmless mean is refused in one line."""
    model, _ = loading.load_model(tiny_llama)
    d, r_hat, mean = direction_file(tmp_path / "direction.pt", tiny_llama, model)
    m = torch.nn.functional.normalize(mean[2, -1], dim=0)
    assert abs(float(r_hat @ m)) > 0.1  # the file's own direction is not orthogonal to it already
    p = directions.project_direction(r_hat, mean[2, -1])
    assert abs(float(p @ m)) < 1e-6 and abs(p.norm().item() - 1) < 1e-6 and float(p @ r_hat) > 0
    basis = torch.linalg.qr(torch.stack([r_hat, m], 1))[0]
    assert (p - basis @ (basis.T @ p)).norm() < 1e-5  # in span{r, m}
    out = tmp_path / "projected"
    directions.main(["--model", tiny_llama, "--ablate-weights", d, "--ablation", "projected", "--out", str(out)])
    meta = json.loads((out / directions.ABLATION_META).read_text())
    assert meta["ablation"] == "projected" and abs(meta["cos_removed_to_file_direction"] - float(p @ r_hat)) < 1e-5
    exported = loading.load_model(str(out))[0].state_dict()
    for name, axis in meta["orthogonalised"].items():
        assert (exported[name].movedim(axis, -1) @ p).abs().max() <= 5e-6 * exported[name].abs().max(), name
    old, _, _ = direction_file(tmp_path / "old.pt", tiny_llama, model, harmless_mean=False)
    with pytest.raises(cli.UserError, match="no harmless_mean in it"):
        directions.main(["--model", tiny_llama, "--ablate-weights", old, "--ablation", "projected", "--out",
                         str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("which", ["llama", "neox"])
def test_norm_preserving_export_keeps_every_written_vectors_length(tiny_llama, tiny_neox, which, tmp_path):
    """--ablation norm-preserving: every vector a rewritten weight writes to the stream (a column of a projection,
    a token's embedding row, a bias: random ones on the GPT-NeoX) keeps its length (1e-5 relative) and has no
    component along the projected direction; the plain export of the same file does not keep them; every other
    weight is the model's own."""
    base, model, _ = base_with_biases(tiny_llama if which == "llama" else tiny_neox, tmp_path / "base")
    d, r_hat, mean = direction_file(tmp_path / "direction.pt", base, model)
    p, original = directions.project_direction(r_hat, mean[2, -1]), model.state_dict()
    for ablation in ("norm-preserving", "plain"):
        directions.main(["--model", base, "--ablate-weights", d, "--ablation", ablation, "--out",
                         str(tmp_path / ablation)])
    meta = json.loads((tmp_path / "norm-preserving" / directions.ABLATION_META).read_text())
    assert meta["ablation"] == "norm-preserving" and meta["residual_component"]["after"] < 1e-5
    kept, plain = loading.load_model(str(tmp_path / "norm-preserving"))[0].state_dict(), \
        loading.load_model(str(tmp_path / "plain"))[0].state_dict()
    assert any("bias" in n for n in meta["orthogonalised"]) == (which == "neox")
    for name, w in original.items():
        if name not in meta["orthogonalised"]:
            assert torch.equal(kept[name], w), name
            continue
        v, v_kept = w.movedim(meta["orthogonalised"][name], -1), kept[name].movedim(meta["orthogonalised"][name], -1)
        assert ((v_kept.norm(dim=-1) - v.norm(dim=-1)).abs() <= 1e-5 * v.norm(dim=-1)).all(), name
        assert (v_kept @ p).abs().max() <= 5e-6 * v.abs().max() and not torch.equal(kept[name], w), name
        v_plain = plain[name].movedim(meta["orthogonalised"][name], -1)
        assert v.dim() == 1 or (v_plain.norm(dim=-1) < v.norm(dim=-1) - 1e-4).any(), name  # plain shortens them


def test_ablation_adapter_equals_the_exported_folder(tiny_llama, tiny_neox, tmp_path):
    """--save-ablated-adapter: a peft LoRA adapter of rank 1 and scale 1 (the output projections' and the embedding's
    rank-1 changes) that peft's PeftModel.from_pretrained puts on the unmodified base, giving the logits of the exported
    model folder (plain and projected, 1e-4), which differ from the base's; the project's adapter check accepts it.
    Refused in one line before any work: norm-preserving (not rank 1), and output projections with biases."""
    from peft import PeftModel

    model, tok = loading.load_model(tiny_llama)
    d, _, _ = direction_file(tmp_path / "direction.pt", tiny_llama, model)
    for ablation in ("plain", "projected"):
        folder, adapter = tmp_path / ablation, tmp_path / f"{ablation}_adapter"
        for out, more in ((folder, []), (adapter, ["--save-ablated-adapter"])):
            directions.main(["--model", tiny_llama, "--ablate-weights", d, "--ablation", ablation, "--out", str(out),
                             *more])
        conf = json.loads((adapter / "adapter_config.json").read_text())
        assert conf["r"] == 1 and conf["lora_alpha"] == 1 and (adapter / artifacts.ADAPTER_MADE_ON).exists()
        meta = json.loads((adapter / directions.ABLATION_META).read_text())
        assert meta["ablation"] == ablation and meta["residual_component"]["after"] < 1e-5
        assert set(conf["target_modules"]) == {n.rpartition(".")[0] for n in meta["orthogonalised"]}
        artifacts.check_adapter(str(adapter), tiny_llama, model.config, skel=model)
        adapted = PeftModel.from_pretrained(loading.load_model(tiny_llama)[0], str(adapter)).eval()
        want = logits(loading.load_model(str(folder))[0], tok)
        assert (logits(adapted, tok) - want).abs().max() <= 1e-4
        assert (logits(model, tok) - want).abs().max() > 1e-3
    with pytest.raises(cli.UserError, match="norm-preserving rescales every vector"):
        directions.main(["--model", tiny_llama, "--ablate-weights", d, "--ablation", "norm-preserving",
                         "--save-ablated-adapter", "--out", str(tmp_path / "x")])
    neox, _ = loading.load_model(tiny_neox)
    dn, _, _ = direction_file(tmp_path / "neox.pt", tiny_neox, neox)
    with pytest.raises(cli.UserError, match="a LoRA adapter cannot carry this write to the residual stream"):
        directions.main(["--model", tiny_neox, "--ablate-weights", dn, "--save-ablated-adapter", "--out",
                         str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_save_ablated_in_a_run_with_surgicals_vector_and_evaluate_reads_it(tiny_llama, prompt_files, tmp_path):
    """directions.py --save-ablated --save-ablated-adapter --ablated-vector false-refusal writes --out/ablated and
    --out/ablated_adapter beside false_refusal.pt; evaluate.py reads them like any model and adapter, and their refusal
    scores are those of evaluate.py --ablate false_refusal.pt."""
    pseudo = tmp_path / "pseudo.json"
    pseudo.write_text(json.dumps([f"How do I kill a Python process number {i}?" for i in range(12)]))
    files = ["--harmful", prompt_files["harmful"], "--harmless", prompt_files["harmless"]]
    with pytest.raises(cli.UserError, match="Surgical's vector is made from --pseudo-harmful prompts"):
        directions.main(["--model", tiny_llama, *files, "--save-ablated", "--ablated-vector", "false-refusal"])
    d = tmp_path / "d"
    directions.main(["--model", tiny_llama, *files, "--pseudo-harmful", str(pseudo), "--n-train", "8", "--n-val", "4",
                     "--save-ablated", "--save-ablated-adapter", "--ablated-vector", "false-refusal", "--out", str(d)])
    meta = json.loads((d / "ablated" / directions.ABLATION_META).read_text())
    assert json.loads((d / "ablated_adapter" / directions.ABLATION_META).read_text())["direction_file"] == \
        meta["direction_file"]
    assert meta["direction_file"] == str(d / "false_refusal.pt") and meta["vector"].startswith("Surgical")
    assert {f for f in os.listdir(d / "ablated")} >= {"config.json", "model.safetensors", "generation_config.json",
                                                       "tokenizer_config.json", "ablation.json"}
    scores = {}
    for name, model, extra in (("ablated", str(d / "ablated"), []),
                               ("hooks", tiny_llama, ["--ablate", str(d / "false_refusal.pt")]),
                               ("adapter", tiny_llama, ["--adapter", str(d / "ablated_adapter")]),
                               ("base", tiny_llama, [])):
        E.main(["--model", model, "--data", prompt_files["harmless"], "--judge", "logit", "--out",
                str(tmp_path / name), *extra])
        rows = [json.loads(x) for x in (tmp_path / name / "responses.jsonl").read_text().splitlines()]
        scores[name] = torch.tensor([r["logit_score"] for r in rows])
    assert (scores["ablated"] - scores["hooks"]).abs().max() <= 1e-3  # logit_score is rounded to 4 decimals
    assert (scores["adapter"] - scores["hooks"]).abs().max() <= 1e-3  # written first, the model given back whole
    assert (scores["ablated"] - scores["base"]).abs().max() > 1e-3


# ---------------------------------------------------------------- merged patches and adapters, every architecture
def test_merged_patch_and_adapter_equal_the_patched_and_adapted_models(arch_model, tmp_path):
    """actor.py --merge equals evaluate.py's --patch (artifacts.apply_patch) and procon.py --merge equals its --adapter
    (artifacts.apply_adapter), on every architecture: max abs difference of the logits <= 1e-4 (fp32)."""
    from peft import LoraConfig, get_peft_model

    arch, path = arch_model
    model, tok = loading.load_model(path)
    plain = logits(model, tok)
    block = loading.decoder_layers(model)[1]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    (tmp_path / "patch").mkdir()
    A.save_patch(str(tmp_path / "patch"), block, {"base_model": path, "layer": 1,
                                                          **artifacts.record(path, model.config)})
    A.main(["--merge", str(tmp_path / "patch"), "--out", str(tmp_path / "merged_patch")])
    fresh, _ = loading.load_model(path)
    artifacts.apply_patch(fresh, str(tmp_path / "patch"), path)
    patched = logits(fresh, tok)
    assert (patched - plain).abs().max() > 1e-3
    assert (logits(loading.load_model(str(tmp_path / "merged_patch"))[0], tok) - patched).abs().max() <= 1e-4

    lora = get_peft_model(loading.load_model(path)[0],
                          LoraConfig(r=4, target_modules=training.lora_targets(model, "auto"),
                                     init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "adapter"))
    P.main(["--merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged_adapter")])
    adapted = logits(artifacts.apply_adapter(loading.load_model(path)[0], str(tmp_path / "adapter"), path), tok)
    assert (adapted - plain).abs().max() > 1e-3
    assert (logits(loading.load_model(str(tmp_path / "merged_adapter"))[0], tok) - adapted).abs().max() <= 1e-4


# ---------------------------------------------------------------- a model larger than one device
def split_flags(tmp_path):
    """A memory limit that leaves the embeddings and layer 0 of the tiny Llama on the CPU and offloads layers 1-3 and
    the final norm to the disk."""
    return ["--device-map", "auto", "--max-memory", "cpu=400KB", "--offload-folder", str(tmp_path / "offload")]


def test_a_model_split_over_cpu_and_disk_gives_the_same_results(one_thread, tiny_llama, prompt_files, tmp_path):
    """directions.py, actor.py (training layer 2, which lives on the disk) and evaluate.py (refusal scores, generated
    responses, --ablate and --patch) on the tiny Llama split by --max-memory into CPU and disk-offloaded layers give
    what the whole model gives: the same layer, direction, patch and scores within 1e-6 (the same arithmetic in the same
    order; only where the weights wait differs). True multi-GPU placement cannot be tested on this CPU machine."""
    flags = split_flags(tmp_path)
    model, _ = loading.load_model(tiny_llama, device_map="auto", max_memory={"cpu": "400KB"},
                             offload_folder=str(tmp_path / "offload"))
    assert set(model.hf_device_map.values()) == {"cpu", "disk"} and loading.offloaded(model)
    assert model.hf_device_map["model.layers.2"] == "disk" and str(loading.model_device(model)) == "cpu"
    del model
    files = ["--harmful", prompt_files["harmful"], "--harmless", prompt_files["harmless"]]
    got = {}
    for name, extra in (("whole", []), ("split", flags)):
        out = tmp_path / name
        directions.main(["--model", tiny_llama, *files, "--n-train", "8", "--n-val", "4", "--out", str(out / "d"),
                         *extra])
        A.main(["--model", tiny_llama, *files, "--pseudo-harmful", prompt_files["harmless"], "--layer", "2",
                "--epochs", "2", "--batch-size", "4", "--out", str(out / "a"), *extra])
        for what, more in (("base", []), ("ablate", ["--ablate", str(out / "d" / "direction.pt")]),
                           ("patch", ["--patch", str(out / "a")])):
            E.main(["--model", tiny_llama, "--data", prompt_files["harmful"], "--limit", "4", "--judge", "logit",
                    "--judge", "keyword", "--max-new-tokens", "4", "--out", str(out / what), *more, *extra])
        from safetensors.torch import load_file

        got[name] = {"direction": torch.load(out / "d" / "direction.pt", weights_only=True),
                     "check": json.loads((out / "d" / "direction.json").read_text())["causal_check"],
                     "patch": load_file(str(out / "a" / "actor_layer.safetensors")),
                     "rows": {w: [json.loads(x) for x in (out / w / "responses.jsonl").read_text().splitlines()]
                              for w in ("base", "ablate", "patch")}}
    whole, split = got["whole"], got["split"]
    assert whole["direction"]["layer"] == split["direction"]["layer"]
    for k in ("direction", "mean_diff"):
        torch.testing.assert_close(split["direction"][k], whole["direction"][k], atol=1e-6, rtol=0)
    assert split["check"] == pytest.approx(whole["check"], abs=1e-6)
    for k, v in whole["patch"].items():
        torch.testing.assert_close(split["patch"][k], v, atol=1e-6, rtol=0)
    for w, rows in whole["rows"].items():
        assert [r["logit_score"] for r in split["rows"][w]] == pytest.approx([r["logit_score"] for r in rows], abs=1e-6)
        assert [r["response"] for r in split["rows"][w]] == [r["response"] for r in rows]
    assert whole["rows"]["ablate"] != whole["rows"]["base"] and whole["rows"]["patch"] != whole["rows"]["base"]


def test_device_map_flags_and_what_cannot_run_offloaded(tiny_llama, prompt_files, tmp_path):
    """--max-memory and --offload-folder need --device-map, which excludes --device; a size must be a size. Training
    (procon.py), a LoRA adapter (peft cannot place it) and an export (the weights rewritten) refuse a model whose
    weights are offloaded, in one line."""
    from peft import LoraConfig, get_peft_model

    for extra, message in ((["--max-memory", "cpu=1GB"], "--max-memory places layers for --device-map"),
                           (["--offload-folder", str(tmp_path)], "--offload-folder places layers for --device-map"),
                           (["--device-map", "auto", "--device", "cpu"], "pass one of them"),
                           (["--device-map", "auto", "--max-memory", "cpu:1GB"], "expected DEVICE=SIZE"),
                           (["--device-map", "auto", "--max-memory", "cpu=lots"], "'lots': not a size"),
                           (["--device-map", "auto", "--max-memory", "7=1GB"], "names GPU 7"),
                           (["--device-map", "most"], "invalid choice")):
        with pytest.raises(cli.UserError, match=message):
            E.main(["--model", tiny_llama, "--data", prompt_files["harmful"], "--out", str(tmp_path / "e"), *extra])
    assert loading.memory_map("0=70GiB, 1=70GiB,cpu=100GiB,disk=1000") == {0: "70GiB", 1: "70GiB", "cpu": "100GiB",
                                                                     "disk": 1000}
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"instruction": f"Bake bread {i}", "output": f"Mix flour {i}."} for i in range(4)]))
    with pytest.raises(cli.UserError, match="training goes through every layer, and some of this model's weights are "
                                           "offloaded"):
        P.main(["--model", tiny_llama, "--data", str(pairs), "--harmful", prompt_files["harmful"], "--harmless",
                prompt_files["harmless"], "--probe-harmful", prompt_files["harmful"], "--probe-harmless",
                prompt_files["harmless"], "--out", str(tmp_path / "p"), *split_flags(tmp_path)])
    model, tok = loading.load_model(tiny_llama, device_map="auto", max_memory={"cpu": "400KB"},
                               offload_folder=str(tmp_path / "offload"))
    get_peft_model(loading.load_model(tiny_llama)[0], LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "adapter"))
    with pytest.raises(cli.UserError, match="a LoRA adapter cannot go on a model whose weights are offloaded"):
        artifacts.apply_adapter(model, str(tmp_path / "adapter"), tiny_llama)
    d = str(tmp_path / "direction.pt")
    artifacts.save_direction(d, torch.nn.functional.normalize(torch.ones(64), dim=0), 2, -1, torch.zeros(4, 1, 64), [0],
                             artifacts.record(tiny_llama, model.config))
    args = directions.parse_args(["--model", tiny_llama])
    with pytest.raises(cli.UserError, match="an export rewrites every weight, and some of this model's are offloaded"):
        directions.save_ablated(str(tmp_path / "x"), args, d, model, tok)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- procon.py in two processes
def torchrun(argv):
    """procon.py under torchrun, two processes on the CPU (gloo), as a user launches it."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(ROOT, "procon.py"), *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_grad_accum_defaults_to_the_processes(monkeypatch):
    """--grad-accum left unset is the number of processes; an explicit one they cannot share stops in one line (checked
    before any process group is joined)."""
    args = P.parse_args(["--model", "m", "--data", "d"])
    assert args.grad_accum is None
    training.init_distributed(args)
    assert args.grad_accum == 1  # one process
    monkeypatch.setattr(training, "WORLD", 2)
    with pytest.raises(cli.UserError, match=r"^--grad-accum 3: each of the 2 processes .* use a multiple of 2$"):
        training.init_distributed(P.parse_args(["--model", "m", "--data", "d", "--grad-accum", "3"]))


@pytest.mark.slow  # three launches of two fresh Python processes (~15 s each on two busy cores)
def test_two_processes_train_what_one_trains_with_grad_accum_2(one_thread, tiny_llama, prompt_files, tmp_path,
                                                                monkeypatch):
    """torchrun --nproc_per_node 2 procon.py --grad-accum 2: each process takes one micro-batch of each step and the
    gradients are summed, so the adapter after 6 steps equals the one-process run's (max abs difference <= 1e-6; the
    same sums in the same order, measured bit-identical here), and so do the logged losses. Rank 0 alone writes; a run
    killed in one process resumes in two; the lock holds against a two-process run, which stops in one line."""
    from safetensors.torch import load_file

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"instruction": f"How do I bake bread number {i}?", "output": f"Mix flour {i}."}
                                 for i in range(10)]))
    flags = ["--model", tiny_llama, "--data", str(pairs), "--harmful", prompt_files["harmful"], "--harmless",
             prompt_files["harmless"], "--probe-harmful", prompt_files["harmful"], "--probe-harmless",
             prompt_files["harmless"], "--epochs", "2", "--batch-size", "2", "--grad-accum", "2", "--max-length", "64",
             "--alpha", "0.5", "--lr", "1e-2", "--save-every", "1"]
    adapter = lambda out: load_file(str(out / "adapter" / "adapter_model.safetensors"))  # noqa: E731
    P.main([*flags, "--out", str(tmp_path / "one")])
    one, log = adapter(tmp_path / "one"), json.loads((tmp_path / "one" / "procon.json").read_text())
    r = torchrun([*flags, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-2000:]
    two, log2 = adapter(tmp_path / "two"), json.loads((tmp_path / "two" / "procon.json").read_text())
    for k, v in one.items():
        assert (two[k] - v).abs().max() <= 1e-6, k
    assert log2["processes"] == 2 and log["processes"] == 1 and len(log2["steps"]) == 6
    assert [s["ce"] for s in log2["steps"]] == pytest.approx([s["ce"] for s in log["steps"]], abs=1e-6)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))  # nothing more, no .run left

    save, seen = rundir.write_checkpoint, []

    def save_then_die(*args):
        save(*args)
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(rundir, "write_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        P.main([*flags, "--out", str(tmp_path / "killed")])
    monkeypatch.undo()
    r = torchrun([*flags, "--out", str(tmp_path / "killed"), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    for k, v in adapter(tmp_path / "killed").items():
        assert (v - one[k]).abs().max() <= 1e-6, k

    held, before = rundir.lock(str(tmp_path / "two")), snapshot(tmp_path / "two")
    try:
        r = torchrun([*flags, "--out", str(tmp_path / "two"), "--overwrite"])
    finally:
        rundir.unlock(held)
    ours = r.stderr.split("exitcode")[0]  # what the two processes printed, before torchrun's own report
    errors = [line for line in ours.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and "exitcode: 2" in r.stderr and "Traceback" not in ours
    assert errors and all("is being written by another run" in e for e in errors)
    assert snapshot(tmp_path / "two") == before


@pytest.mark.slow  # one launch of two fresh Python processes, one run in this one
def test_two_processes_without_grad_accum_train_what_one_trains_with_grad_accum_2(one_thread, tiny_llama,
                                                                                  prompt_files, tmp_path):
    """torchrun --nproc_per_node 2 procon.py with no --grad-accum runs (the default is the number of processes, 2) and
    trains the adapter one process trains with --grad-accum 2 (max abs difference <= 1e-6, as above); the run's
    recorded settings say 2."""
    from safetensors.torch import load_file

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"instruction": f"How do I bake bread number {i}?", "output": f"Mix flour {i}."}
                                 for i in range(10)]))
    flags = ["--model", tiny_llama, "--data", str(pairs), "--harmful", prompt_files["harmful"], "--harmless",
             prompt_files["harmless"], "--probe-harmful", prompt_files["harmful"], "--probe-harmless",
             prompt_files["harmless"], "--epochs", "2", "--batch-size", "2", "--max-length", "64", "--alpha", "0.5",
             "--lr", "1e-2"]
    adapter = lambda out: load_file(str(out / "adapter" / "adapter_model.safetensors"))  # noqa: E731
    P.main([*flags, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    r = torchrun([*flags, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert one.keys() == two.keys()
    for k, v in one.items():
        assert (two[k] - v).abs().max() <= 1e-6, k
    log = json.loads((tmp_path / "two" / "procon.json").read_text())
    assert log["processes"] == 2 and log["args"]["grad_accum"] == 2 and len(log["steps"]) == 6  # 3 steps an epoch
