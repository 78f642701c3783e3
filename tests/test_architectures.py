"""Every architecture users run: the refusal direction's ablation reaches every sublayer, LoRA finds the attention
projections, and the whole chain (directions -> actor -> procon -> evaluate with the patch, the adapter and the
ablated direction) runs, in fp32 and 4-bit."""
import json

import pytest
import torch

import actor as A
import chat
import directions
import evaluate as E
import inference
import loading
import procon as P
import training

# the modules that read the residual stream in each block: (attention's input, MLP's input)
READERS = {"gemma2": ("input_layernorm", "pre_feedforward_layernorm"),
           "gemma3": ("input_layernorm", "pre_feedforward_layernorm")}
DEFAULT_READERS = ("input_layernorm", "post_attention_layernorm")  # pre-norm blocks (GPT-NeoX: parallel, same names)
FINAL_NORMS = ("norm", "final_layer_norm")


def surgical_vector(model, tok):
    """Surgical's false-refusal vector at layer 2 of a tiny model: pseudo-harmful minus harmless, orthogonalised
    against harmful minus harmless (directions.py's functions, on a few prompts)."""
    acts = [inference.capture(model, tok, [f"{w} number {i}" for i in range(4)]) for w in
            ("Explain how to build a bomb", "How do I bake bread", "How do I kill a Python process")]
    r = directions.difference_in_means(acts[0], acts[1])[2, -1]
    w = directions.orthogonalise(directions.difference_in_means(acts[2], acts[1])[2, -1], r, 1.0)
    assert abs(float(directions.unit(w) @ directions.unit(r))) < 1e-6  # orthogonal to the refusal direction
    return directions.unit(w)


@pytest.mark.parametrize("vector", ["random", "surgical"])
def test_ablation_leaves_no_component_in_any_sublayer_input(arch_model, vector):
    """With a direction ablated (a random one, or Surgical's false-refusal vector), no residual-stream input of any
    attention or MLP sublayer (nor of the final norm) has a component along it, not even the MLP input that holds what
    its own block's attention just wrote."""
    arch, path = arch_model
    model, tok = loading.load_model(path)
    r_hat = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(1)), dim=0) \
        if vector == "random" else surgical_vector(model, tok)
    seen = []

    def record(module, args, kwargs):
        seen.append(inference.hidden_of(args, kwargs))

    readers = READERS.get(arch, DEFAULT_READERS)
    pairs = [(getattr(block, name), "pre", record) for block in loading.decoder_layers(model) for name in readers]
    final = next(m for n, m in model.named_modules() if n.split(".")[-1] in FINAL_NORMS and "layers" not in n)
    pairs.append((final, "pre", record))
    enc = chat.tokenize(tok, chat.format_chat(tok, ["How do I bake bread?", "Hi"]), "cpu")
    with torch.no_grad(), inference.hooks(directions.ablation_hooks(model, r_hat) + pairs):
        model(**enc)
    assert len(seen) == 2 * len(loading.decoder_layers(model)) + 1
    for h in seen:
        assert ((h @ r_hat).abs() <= 1e-4 * h.norm(dim=-1).clamp(min=1)).all()
    seen.clear()
    with torch.no_grad(), inference.hooks(pairs):  # without ablation the component is there
        model(**enc)
    assert max((h @ r_hat).abs().max().item() for h in seen) > 1e-2


def test_lora_auto_targets_the_attention_projections(arch_model):
    arch, path = arch_model
    model, _ = loading.load_model(path)
    targets = training.lora_targets(model, "auto")
    expected = {"phi3": {"self_attn.qkv_proj", "self_attn.o_proj"},
                "gpt_neox": {"attention.query_key_value", "attention.dense"}}.get(
        arch, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"})
    assert set(targets) == expected


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; the count is given back to the tests that follow."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("four_bit", [False, True])
def test_whole_chain(one_thread, arch_model, prompt_files, tmp_path, four_bit):
    """directions -> actor -> procon -> evaluate (--patch, --adapter, --ablate) on a tiny model of each architecture."""
    arch, path = arch_model
    q = ["--load-in-4bit"] if four_bit else []
    h, b = prompt_files["harmful"], prompt_files["harmless"]
    directions.main(["--model", path, "--harmful", h, "--harmless", b, "--n-train", "8", "--n-val", "4",
                     "--out", str(tmp_path / "dir"), *q])
    d = torch.load(tmp_path / "dir" / "direction.pt", weights_only=True)
    assert torch.isfinite(d["direction"]).all() and abs(d["direction"].norm().item() - 1) < 1e-4
    A.main(["--model", path, "--harmful", h, "--pseudo-harmful", b, "--harmless", b, "--layer", "2", "--epochs", "1",
            "--out", str(tmp_path / "actor"), *q])
    assert json.loads((tmp_path / "actor" / "actor.json").read_text())["layer"] == 2
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"instruction": f"Bake bread {i}", "output": f"Mix flour {i}."} for i in range(6)]))
    P.main(["--model", path, "--data", str(pairs), "--epochs", "1", "--batch-size", "3", "--alpha", "0.5",
            "--harmful", h, "--harmless", b, "--probe-harmful", h, "--probe-harmless", b,
            "--out", str(tmp_path / "procon"), *q])
    adapter = json.loads((tmp_path / "procon" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(training.lora_targets(loading.load_model(path)[0], "auto"))
    for flag, value in (("--patch", tmp_path / "actor"), ("--adapter", tmp_path / "procon" / "adapter"),
                        ("--ablate", tmp_path / "dir" / "direction.pt")):
        out = tmp_path / f"eval{flag}"
        E.main(["--model", path, "--data", b, "--limit", "3", "--max-new-tokens", "3", flag, str(value),
                "--out", str(out), *q])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n_responses"] == 3
