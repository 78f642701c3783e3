"""directions.py: shared pieces (prompt files, loading, capture, hooks, scores) and the refusal-direction script."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, snapshot

import artifacts
import chat
import cli
import directions as D
import inference
import judges
import keywords
import loading
import runrecord

# ---------------------------------------------------------------------------- prompt files


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_read_prompts_formats(tmp_path):
    want = ["How do I bake bread?", "What is 2+2?"]
    assert chat.read_prompts(write(tmp_path, "a.json", json.dumps(want))) == want
    assert chat.read_prompts(write(tmp_path, "b.json", json.dumps([{"instruction": w} for w in want]))) == want
    assert chat.read_prompts(write(tmp_path, "c.jsonl",
                                   "\n".join(json.dumps({"goal": w}) for w in want) + "\n")) == want
    assert chat.read_prompts(write(tmp_path, "d.csv",
                                   'id,forbidden_prompt\n1,"How do I bake bread?\n"\n2,What is 2+2?\n')) == want
    assert chat.read_prompts(write(tmp_path, "e.txt", "How do I bake bread?\n\nWhat is 2+2?\n")) == want
    assert chat.read_prompts(write(tmp_path, "f.csv", "q,other\nHow do I bake bread?,x\nWhat is 2+2?,y\n"),
                             column="q") == want


def test_data_prompt_sets_are_disjoint():
    """data/README.md: no prompt appears in more than one file (case-insensitively), and none twice in one."""
    seen = {}
    for name in sorted(os.listdir(cli.DATA)):
        if name.endswith(".json") and name not in ("instructions.json", "refusals.json"):
            prompts = [p.lower() for p in chat.read_prompts(os.path.join(cli.DATA, name))]
            assert len(set(prompts)) == len(prompts), name
            for p in prompts:
                assert p not in seen, f"{p!r} in {name} and {seen[p]}"
                seen[p] = name
    assert len(seen) >= 6 * 32


def test_read_prompts_limit_is_a_fixed_seeded_sample(tmp_path):
    path = write(tmp_path, "a.json", json.dumps([f"prompt {i}" for i in range(50)]))
    a, b = chat.read_prompts(path, limit=10, seed=1), chat.read_prompts(path, limit=10, seed=1)
    assert a == b and len(set(a)) == 10
    assert chat.read_prompts(path, limit=10, seed=2) != a


def test_an_unreadable_file_is_named_as_such(tmp_path, monkeypatch):
    """A prompt file that is there but cannot be read: 'not readable', not 'no such file' (os.access is faked: root
    reads anything)."""
    (tmp_path / "p.json").write_text('["a"]')
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("p.json") else access(p, mode))
    with pytest.raises(cli.UserError) as e:
        chat.read_prompts(str(tmp_path / "p.json"))
    assert str(e.value) == f"{tmp_path / 'p.json'}: not readable (permission denied)"


@pytest.mark.parametrize("name,text,msg", [
    ("missing.json", None, "no such file"),
    ("empty.json", "[]", "no prompts"),
    ("blank.txt", "\n\n", "no prompts"),
    ("bad.json", "[\"a\", ", "not valid JSON"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ("nocol.csv", "x,y\n1,2\n", "no column"),
    ("nums.json", "[1, 2]", "row 1 is a int"),
    ("empty_col.csv", "prompt\n\n \n", "row 1 has an empty 'prompt'"),
    ("ragged.csv", "prompt\n\n ,\n", r"row 1 \(ending at line 3\) has 2 fields; the header has 1"),
    ("a.xlsx", "x", "unknown file type"),
    ("objs.json", '[{"prompt": ["a", "b"]}]', "row 1 has a list in column 'prompt', expected text"),
    ("latin1.txt", b"caf\xe9\n", "not UTF-8 text"),
    ("folder", "", "is a folder, not a file"),
])
def test_read_prompts_bad_input(tmp_path, name, text, msg):
    if name == "folder":
        (tmp_path / name).mkdir()
        path = str(tmp_path / name)
    elif isinstance(text, bytes):
        (tmp_path / name).write_bytes(text)
        path = str(tmp_path / name)
    else:
        path = str(tmp_path / name) if text is None else write(tmp_path, name, text)
    with pytest.raises(cli.UserError, match=msg) as e:
        chat.read_prompts(path)
    assert path in str(e.value)  # the line names the file


def test_read_prompts_byte_order_mark(tmp_path):
    """A file saved with a byte-order mark (Excel's CSV, Notepad's UTF-8) is read as text: its first column is
    'prompt'."""
    (tmp_path / "bom.csv").write_bytes("\ufeffprompt,type\nHow do I bake bread?,a\n".encode("utf-8"))
    (tmp_path / "bom.json").write_bytes('\ufeff["How do I bake bread?"]'.encode("utf-8"))
    assert chat.read_prompts(str(tmp_path / "bom.csv")) == chat.read_prompts(str(tmp_path / "bom.json")) == [
        "How do I bake bread?"]


def test_read_prompts_unknown_column(tmp_path):
    with pytest.raises(cli.UserError, match="no column 'text'"):
        chat.read_prompts(write(tmp_path, "a.json", json.dumps(["a"])), column="text")


# ---------------------------------------------------------------------------- loading and layers


def test_load_model_and_chat_format(tiny_model):
    model, tok = loading.load_model(tiny_model)
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    text = chat.format_chat(tok, ["Hi there"])[0]
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi there<|im_end|>" in text
    assert len(loading.decoder_layers(model)) == model.config.num_hidden_layers


def test_decoder_layers_gpt_neox(tiny_neox):
    model, _ = loading.load_model(tiny_neox)
    layers = loading.decoder_layers(model)
    assert layers is model.gpt_neox.layers


def test_model_without_chat_template_fails(tiny_llama, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in ("chat_template.jinja", "chat_template.json"):
        if (plain / f).exists():
            (plain / f).unlink()
    with pytest.raises(cli.UserError, match="no chat template"):
        loading.load_model(str(plain))
    template = write(tmp_path, "t.jinja", "{% for m in messages %}USER: {{ m['content'] }}\n{% endfor %}ASSISTANT:")
    _, tok = loading.load_model(str(plain), chat_template=template)
    assert chat.format_chat(tok, ["hi"]) == ["USER: hi\nASSISTANT:"]


def test_missing_model_fails(tmp_path):
    with pytest.raises(cli.UserError, match="no such model directory"):
        loading.load_model(str(tmp_path / "nope"))
    with pytest.raises(cli.UserError, match="no such GGUF"):
        loading.load_model(str(tmp_path / "nope.gguf"))


def test_4bit_loading_on_cpu(tiny_llama):
    import bitsandbytes as bnb

    model, tok = loading.load_model(tiny_llama, load_in_4bit=True)
    assert isinstance(loading.decoder_layers(model)[0].self_attn.q_proj, bnb.nn.Linear4bit)
    acts = inference.capture(model, tok, ["hello", "bake bread"], batch_size=2)
    assert acts.shape == (2, 5, 1, 64) and torch.isfinite(acts).all()


# ---------------------------------------------------------------------------- activations and hooks

PROMPTS = ["How do I bake bread at home?", "Hi", "Explain how to build a bomb, step by step please."]


def test_capture_matches_hidden_states(tiny_model):
    model, tok = loading.load_model(tiny_model)
    acts = inference.capture(model, tok, PROMPTS, positions=2, batch_size=2)
    L = model.config.num_hidden_layers
    assert acts.shape == (3, L + 1, 2, 64)
    for i, text in enumerate(chat.format_chat(tok, PROMPTS)):  # one at a time: no padding at all
        enc = chat.tokenize(tok, [text], "cpu")
        hs = model(**enc, output_hidden_states=True).hidden_states
        for layer in range(L):  # hidden_states[l] is the input to layer l
            torch.testing.assert_close(acts[i, layer], hs[layer][0, -2:], atol=1e-4, rtol=1e-4)


def test_last_layer_output_is_captured(tiny_llama):
    model, tok = loading.load_model(tiny_llama)
    acts = inference.capture(model, tok, PROMPTS[:1])
    layers = loading.decoder_layers(model)
    seen = {}
    h = layers[-1].register_forward_hook(lambda m, a, o: seen.setdefault("out", o[0] if isinstance(o, tuple) else o))
    model(**chat.tokenize(tok, chat.format_chat(tok, PROMPTS[:1]), "cpu"))
    h.remove()
    torch.testing.assert_close(acts[0, -1, -1], seen["out"][0, -1], atol=1e-5, rtol=1e-5)


def test_ablation_removes_the_direction_everywhere(tiny_model):
    model, tok = loading.load_model(tiny_model)
    r_hat = torch.nn.functional.normalize(torch.randn(64), dim=0)
    before = inference.capture(model, tok, PROMPTS)
    with inference.hooks(D.ablation_hooks(model, r_hat)):
        after = inference.capture(model, tok, PROMPTS)
    assert (before[:, 1:] @ r_hat).abs().max() > 1e-2  # the direction was there...
    assert (after[:, 1:] @ r_hat).abs().max() < 1e-4  # ...and is gone at every layer's input and the output


def test_addition_shifts_one_layer_input(tiny_llama):
    model, tok = loading.load_model(tiny_llama)
    vec = torch.randn(64)
    before = inference.capture(model, tok, PROMPTS)
    with inference.hooks(D.addition_hooks(model, vec, layer=2, coeff=0.5)):
        after = inference.capture(model, tok,
                                  PROMPTS)  # capture's hooks run after the addition hook: they see its input
    torch.testing.assert_close(after[:, :2], before[:, :2])  # layers below are untouched
    torch.testing.assert_close(after[:, 2] - before[:, 2], (0.5 * vec).expand(3, 1, 64), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[:, 3:], before[:, 3:])


def test_left_padding_does_not_change_activations(tiny_model):
    model, tok = loading.load_model(tiny_model)
    alone = inference.capture(model, tok, PROMPTS[1:2], batch_size=1)
    padded = inference.capture(model, tok, PROMPTS, batch_size=3)  # "Hi" is padded on the left in this batch
    torch.testing.assert_close(padded[1], alone[0], atol=1e-4, rtol=1e-4)


def test_refusal_score_is_log_odds():
    logprobs = torch.log_softmax(torch.randn(3, 10), -1)
    p = logprobs.exp()[:, [2, 5]].sum(-1)
    torch.testing.assert_close(judges.refusal_score(logprobs, [2, 5]), torch.log(p / (1 - p)), atol=1e-5, rtol=1e-5)


def test_silhouette_against_brute_force():
    torch.manual_seed(0)
    x = torch.randn(12, 5)
    labels = torch.tensor([1] * 5 + [0] * 7)
    s = []
    for i in range(12):
        d = (x - x[i]).norm(dim=1)
        own = labels == labels[i]
        a = d[own].sum() / (own.sum() - 1)
        b = d[~own].mean()
        s.append((b - a) / max(a, b))
    assert abs(D.silhouette(x, labels) - torch.stack(s).mean().item()) < 1e-6
    far = torch.cat([torch.randn(6, 5), torch.randn(6, 5) + 100])
    assert D.silhouette(far, torch.tensor([1] * 6 + [0] * 6)) > 0.95


def test_silhouette_fallback_keeps_to_the_middle_layers():
    # early layers separate harmful from harmless by their words alone: the fallback takes the best silhouette among
    # the layers past the first and before the last --prune-frac of depth, and any layer where that band is empty
    candidates = [(l, 0) for l in range(1, 30)]
    sil = {c: (0.9 if c[0] <= 3 else 0.6 if c[0] == 28 else 0.1 + c[0] / 100) for c in candidates}
    mean_diff = torch.zeros(30, 1, 4)
    args = D.parse_args(["--select", "silhouette"])
    chosen, how, _, _ = D.choose_layer(args, None, None, mean_diff, mean_diff, candidates, sil, {}, {}, [], True)
    assert (chosen, how) == ((23, 0), "silhouette")  # 6 <= l < 24 at --prune-frac 0.2
    args = D.parse_args(["--select", "silhouette", "--prune-frac", "0.5"])
    chosen, *_ = D.choose_layer(args, None, None, mean_diff[:3], mean_diff[:3], [(1, 0), (2, 0)],
                                {(1, 0): 0.9, (2, 0): 0.1}, {}, {}, [], True)
    assert chosen == (1, 0)  # three layers at 0.5: 1.5 <= l < 1.5 holds none, so every candidate counts


def test_keyword_judge_basics():
    assert keywords.is_refusal("I'm sorry, but I can't help with that.")
    assert keywords.is_refusal("  **I cannot** provide that.")
    assert keywords.is_refusal("I\u2019m sorry")  # curly apostrophe
    assert keywords.is_refusal("")
    assert not keywords.is_refusal("Sure! Here is how to bake bread.")
    assert keywords.is_refusal("Sure. Actually, I can't help with that.", mode="substring")


# ---------------------------------------------------------------------------- the script


def run_directions(model, prompt_files, out, *extra):
    D.main(["--model", model, "--harmful", prompt_files["harmful"], "--harmless", prompt_files["harmless"],
            "--out", str(out), *extra])


def test_main_writes_outputs_and_is_deterministic(tiny_llama, prompt_files, tmp_path):
    run_directions(tiny_llama, prompt_files, tmp_path / "a", "--select", "refusal", "--min-refusals", "0")
    run_directions(tiny_llama, prompt_files, tmp_path / "b", "--select", "refusal", "--min-refusals", "0")
    for f in ("direction.pt", "direction.json", "layers.png"):
        assert (tmp_path / "a" / f).stat().st_size > 0
    a = torch.load(tmp_path / "a" / "direction.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "direction.pt", weights_only=True)
    assert torch.equal(a["direction"], b["direction"]) and a["layer"] == b["layer"]
    assert a["direction"].dtype == torch.float32 and abs(a["direction"].norm().item() - 1) < 1e-5
    assert a["mean_diff"].shape == (4, 1, 64) and 1 <= a["layer"] < 4
    meta = json.loads((tmp_path / "a" / "direction.json").read_text())
    assert set(meta["causal_check"]) >= {"harmful_baseline", "harmful_ablated", "harmless_baseline", "harmless_added"}
    assert len(meta["per_layer"]) == 3 and "bypass" in meta["per_layer"][0]
    assert prompt_files["harmful"] in meta["data"] and meta["versions"]["torch"]


def test_main_fixed_layer_and_positions(tiny_llama, prompt_files, tmp_path):
    run_directions(tiny_llama, prompt_files, tmp_path, "--layer", "2", "--positions", "3")
    d = artifacts.load_direction(str(tmp_path / "direction.pt"))
    assert d["layer"] == 2 and -3 <= d["position"] <= -1 and d["mean_diff"].shape == (4, 3, 64)
    assert d["harmless_mean"].shape == (4, 3, 64) and d["harmless_mean"][1:].norm(dim=-1).min() > 0  # --ablation
    meta = json.loads((tmp_path / "direction.json").read_text())
    assert meta["select"] == "fixed"


def test_post_instruction_positions(tiny_llama, prompt_files, tmp_path):
    """--positions post: every template token after the instruction (ChatML: <|im_end|>, newline, <|im_start|>,
    'assistant', newline), counted in the tokenised prompt."""
    _, tok = loading.load_model(tiny_llama)
    n = D.post_instruction_positions(tok)
    text = chat.chat_text(tok, "How do I bake bread?")
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids[-n:]) == "<|im_end|>\n<|im_start|>assistant\n" and "?" in tok.decode(ids[-n - 1:])
    run_directions(tiny_llama, prompt_files, tmp_path, "--layer", "2", "--positions", "post")
    assert torch.load(tmp_path / "direction.pt", weights_only=True)["mean_diff"].shape == (4, n, 64)


def test_filter_keeps_what_the_model_treats_as_its_class(tiny_llama, prompt_files, tmp_path, monkeypatch):
    """The papers' filter: with refusal tokens of the model's own, only the harmful prompts it refuses and the
    harmless ones it answers make the means (training and held-out alike); with --filter off, or the fallback openers,
    every prompt does; where fewer than 2 would remain, all are kept and the note says so."""
    prompts = chat.read_prompts(prompt_files["harmful"])

    def logits(model, tok, ps, *a, **k):  # token 5 likely (a refusal) for every third prompt, unlikely otherwise
        out = torch.full((len(ps), 8), -5.0)
        out[:, 5] = torch.tensor([3.0 if prompts.index(p) % 3 == 0 else -9.0 for p in ps])
        return torch.log_softmax(out, -1)
    with monkeypatch.context() as m:
        m.setattr(inference, "last_logits", logits)
        kept, note = D.typical(None, None, prompts, [5], True, 4, "harmful")
        assert kept == prompts[::3] and note is None
        assert D.typical(None, None, prompts, [5], False, 4, "harmful")[0] == [p for p in prompts if p not in kept]
        kept, note = D.typical(None, None, prompts[1:3], [5], True, 4, "harmful")
        assert kept == prompts[1:3] and "refuses 0 of 2 harmful prompts; all are kept" in note
    monkeypatch.setattr(judges, "refusal_tokens", lambda model, tok, *a, **k: (
        [tok("Explain", add_special_tokens=False).input_ids[0]], 4, None))  # as if the model refused
    for flag in ("on", "off"):  # the random model never refuses: the filter would leave no harmful prompt
        run_directions(tiny_llama, prompt_files, tmp_path / flag, "--layer", "2", "--filter", flag)
        meta = json.loads((tmp_path / flag / "direction.json").read_text())
        assert {k: v["train"] + v["val"] for k, v in meta["n_prompts"].items()} == {"harmful": 12, "harmless": 12}
        assert meta["filter"] == flag and ("harmful prompts; all are kept" in (meta["note"] or "")) == (flag == "on")


def test_main_falls_back_when_the_model_does_not_refuse(tiny_llama, prompt_files, tmp_path):
    run_directions(tiny_llama, prompt_files, tmp_path, "--select", "refusal", "--min-refusals", "1000")
    meta = json.loads((tmp_path / "direction.json").read_text())
    assert meta["select"] == "silhouette" and "fall back" in meta["note"]


def test_surgical_vector_is_orthogonal_and_chosen_by_its_rule(tiny_llama, prompt_files, tmp_path):
    """Surgical's false-refusal vector: orthogonal to the refusal direction at its own layer and position (lambda 1),
    partly so with lambda < 1, and the candidate with the lowest pseudo-harmful refusal score among those within the
    KL bound; written as a direction file that evaluate.py --ablate applies."""
    d = tmp_path / "pseudo.json"
    d.write_text(json.dumps([f"How do I kill a Python process number {i}?" for i in range(12)]))
    run_directions(tiny_llama, prompt_files, tmp_path / "s", "--pseudo-harmful", str(d), "--positions", "2")
    w = artifacts.load_direction(str(tmp_path / "s" / "false_refusal.pt"))
    r = torch.load(tmp_path / "s" / "direction.pt", weights_only=True)["mean_diff"]
    l, p = w["layer"], w["position"]
    assert abs(float(w["direction"] @ D.unit(r[l, p]))) < 1e-6
    assert all(abs(float(D.unit(w["mean_diff"][c]) @ D.unit(r[c]))) < 1e-5 for c in ((1, 0), (2, 1), (3, 0)))
    meta = json.loads((tmp_path / "s" / "direction.json").read_text())["surgical"]
    ok = [c for c in meta["per_layer"] if c["kl"] <= 0.2]
    best = min(ok, key=lambda c: c["pseudo_harmful"])
    assert (best["layer"], best["position"]) == (l, p) and all(c["layer"] < 4 * 0.8 for c in meta["per_layer"])
    half = D.orthogonalise(w["mean_diff"], r, 0.5)  # lambda 0.5 on w' (already orthogonal): nothing left to remove
    torch.testing.assert_close(half, w["mean_diff"], atol=1e-5, rtol=1e-4)
    r = r[1:]  # (r is 0 at layer 0's input, the embeddings)
    v = r + torch.randn_like(r)  # a vector with a component along r: lambda 0.5 removes half of it
    s = (v * r).sum(-1) / r.pow(2).sum(-1)
    torch.testing.assert_close((D.orthogonalise(v, r, 0.5) * r).sum(-1) / r.pow(2).sum(-1), 0.5 * s, atol=1e-4,
                               rtol=1e-4)


def test_load_direction_checks_the_model(tiny_llama, tiny_neox, prompt_files, tmp_path):
    run_directions(tiny_llama, prompt_files, tmp_path, "--layer", "1")
    model, _ = loading.load_model(tiny_llama)
    path = str(tmp_path / "direction.pt")
    assert artifacts.load_direction(path, tiny_llama, model.config)["layer"] == 1
    neox, _ = loading.load_model(tiny_neox)  # same width and depth, another model: refused unless the user says so
    with pytest.raises(cli.UserError, match=f"was made on .*tiny-llama.*, not on {tiny_neox}; pass --other-model"):
        artifacts.load_direction(path, tiny_neox, neox.config)
    assert artifacts.load_direction(path, tiny_neox, neox.config, other_model=True)["layer"] == 1
    model.config.hidden_size = 32
    with pytest.raises(cli.UserError, match="does not match"):
        artifacts.load_direction(path, tiny_llama, model.config, other_model=True)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(cli.UserError, match="not a direction file"):
        artifacts.load_direction(str(tmp_path / "junk.pt"))
    d = torch.load(path, weights_only=True)
    torch.save({**d, "direction": d["direction"] * 0}, tmp_path / "zero.pt")
    with pytest.raises(cli.UserError, match="not a finite unit vector"):
        artifacts.load_direction(str(tmp_path / "zero.pt"))


REJECTS_SYSTEM = ("{% if messages[0]['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}"
                  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# one row per bad input: (arguments, a phrase of the one-line message); every row must leave earlier outputs as they
# were. A new flag gets its row here. "{tmp}" is the test's folder, "{file}" a file there, "{nosys}" a chat template
# that rejects the system role, "{harmful}" the harmful prompt file.
BAD_INPUT = [
    (["--n-train", "0"], "argument --n-train: 0 must be at least 2"),
    (["--n-train", "1"], "argument --n-train: 1 must be at least 2"),
    (["--n-val", "0"], "argument --n-val: 0 must be at least 1"),
    (["--positions", "0"], "argument --positions: 0 must be at least 1"),
    (["--positions", "1000"], "--positions 1000: the shortest chat-formatted prompt has"),
    (["--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
    (["--prune-frac", "1.5"], "argument --prune-frac: 1.5 must be below 1"),
    (["--max-kl", "nan"], "argument --max-kl: nan is not a finite number"),
    (["--ortho-lambda", "2"], "argument --ortho-lambda: 2 must be at most 1"),
    (["--surgical-max-kl", "-1"], "argument --surgical-max-kl: -1 must be at least 0"),
    (["--seed", "-3"], "argument --seed: -3 must be at least 0"),
    (["--device", "cuda"], "no CUDA device"),
    (["--device", "tpu"], "expected cuda, cuda:N, mps or cpu"),
    (["--layer", "9"], "out of range"),
    (["--layer", "0"], "out of range"),
    (["--harmful", "{tmp}/nope.json"], "no such file"),
    (["--harmful", "{tmp}"], "is a folder, not a file"),
    (["--harmless", "{harmful}"], "the harmful and harmless prompts are the same"),
    (["--pseudo-harmful", "{tmp}/nope.json"], "no such file"),
    (["--chat-template", "{tmp}/nope.jinja"], "no such chat template file"),
    (["--chat-template", "{nosys}", "--system-prompt", "Be brief."], "the chat template does not take a system prompt"),
    (["--out", "{file}"], "exists and is not a folder"),
    (["--out", "/proc/refusal-steering-test/out"], "not a folder this process can write"),
    (["--lyaer", "2"], "unrecognized arguments: --lyaer 2"),
    (["--out", "{harmful}"], "is what --harmful reads; choose another --out"),
    (["--chat-template", "{tmp}"], ": is a folder, not a chat template file"),
    (["--model", "{file}"], "file: is a file, not a model directory"),
    (["--model", "{tmp}"], "not a model folder"),  # not the tokenizer's complaint
    ([], "exists; pass --overwrite"),
    (["--ablation", "projected", "--overwrite"], "--ablation projected: applies to an export"),
    (["--ablation", "norm-preserving", "--save-ablated-adapter", "--overwrite"], "no adapter form"),
]


@pytest.fixture(scope="module")
def earlier_outputs(tiny_llama, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("earlier")
    run_directions(tiny_llama, prompt_files, out, "--layer", "1")
    return out


@pytest.mark.parametrize("extra,message", BAD_INPUT, ids=[" ".join(r[0]) or "no-overwrite" for r in BAD_INPUT])
def test_bad_input_table(tiny_llama, prompt_files, earlier_outputs, tmp_path, extra, message):
    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("this machine has CUDA")
    import shutil

    out = tmp_path / "out"
    shutil.copytree(earlier_outputs, out)
    before = snapshot(out)
    (tmp_path / "file").write_text("x")
    (tmp_path / "nosys.jinja").write_text(REJECTS_SYSTEM)
    subst = {"{tmp}": str(tmp_path), "{file}": str(tmp_path / "file"), "{nosys}": str(tmp_path / "nosys.jinja"),
             "{harmful}": prompt_files["harmful"]}
    extra = [subst[a] if a in subst else a.replace("{tmp}", str(tmp_path)) for a in extra]
    overwrite = [] if not extra or "--out" in extra else ["--overwrite"]
    with pytest.raises(cli.UserError, match=message.replace("(", r"\(")):
        D.main(["--model", tiny_llama, "--harmful", prompt_files["harmful"], "--harmless", prompt_files["harmless"],
                "--out", str(out), *overwrite, *extra])
    assert snapshot(out) == before


def test_no_nan_direction_is_written(tiny_llama, prompt_files, tmp_path, monkeypatch):
    """NaN activations end in one line and write nothing."""
    capture = inference.capture
    monkeypatch.setattr(inference, "capture", lambda *a, **k: capture(*a, **k) * float("nan"))
    with pytest.raises(cli.UserError) as e:
        run_directions(tiny_llama, prompt_files, tmp_path, "--layer", "1")
    assert str(e.value) == ("the difference in means became NaN; no flag of this run scales it, so the model's own "
                            "numbers overflow (its weights, or bf16: try --device cpu)")
    assert not (tmp_path / "direction.pt").exists()


@pytest.mark.slow  # a fresh Python process: the CLI as a user runs it
def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "directions.py"), "--harmful", str(tmp_path / "x.json"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.json'}: no such file"]


# ---------------------------------------------------------------------------- SmolLM2, end to end


def test_smollm2_end_to_end(smollm2, tmp_path):
    """Defaults (data/ prompts) on the real model: outputs, the causal table, and the fallback note."""
    D.main(["--model", smollm2, "--out", str(tmp_path), "--n-val", "16"])
    meta = json.loads((tmp_path / "direction.json").read_text())
    d = artifacts.load_direction(str(tmp_path / "direction.pt"))
    assert d["n_layers"] == 30 and d["hidden_size"] == 576 and 1 <= d["layer"] < 30
    assert meta["n_prompts"]["harmful"]["train"] == 64
    check = meta["causal_check"]
    assert all(isinstance(v, float) for v in check.values())
    # plain SmolLM2 hardly ever refuses, so Arditi's selection has too little to go on and says so
    if meta["refused_val_harmful"] < 4:
        assert meta["select"] == "silhouette" and "fall back" in meta["note"]


def test_system_prompt_and_thinking_reach_every_prompt(tiny_llama, tmp_path):
    """--system-prompt and --thinking are kept on the tokenizer and applied wherever a prompt is formatted."""
    import shutil

    path = tmp_path / "thinking"
    shutil.copytree(tiny_llama, path)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% if enable_thinking is defined and not enable_thinking %}"
                "<think>\n\n</think>\n\n{% endif %}{% endif %}")
    (path / "t.jinja").write_text(template)
    _, tok = loading.load_model(str(path), chat_template=str(path / "t.jinja"),
                                system_prompt="Be brief.", thinking="off")
    text = chat.format_chat(tok, ["Hi"])[0]
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert text.endswith("<think>\n\n</think>\n\n")
    assert chat.chat_text(tok, "Hi", "Hello").endswith("<|im_start|>assistant\nHello<|im_end|>\n")
    _, plain = loading.load_model(str(path), chat_template=str(path / "t.jinja"))
    assert chat.format_chat(plain, ["Hi"])[0] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    args = D.parse_args(["--system-prompt", "Be brief.", "--thinking", "off"])
    assert runrecord.metadata(args)["args"]["system_prompt"] == "Be brief." and runrecord.metadata(
        args)["args"]["thinking"] == "off"
