"""A model is loaded whole or refused, and every row of a prompt or pair file is read or the file refused (issue 40,
classes 1 and 2): each bad input ends in one line (cli.UserError) that names the file and the mismatch or the row."""
import json
import os
import shutil

import pytest

import chat
import cli
import evaluate as E
import loading
import training


def variant(src, dst, config=None):
    """A copy of a model folder, its config.json changed by `config`."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return str(dst)


def refused(path, match):
    """load_model refuses the folder (flags are checked first, as every script does) with one line matching."""
    with pytest.raises(cli.UserError, match=match) as e:
        loading.check_model_path(path)
        loading.load_model(path, device="cpu")
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- class 1: a model is loaded whole or refused
def test_a_config_naming_more_or_fewer_layers_than_the_weights_is_refused(tiny_llama, tmp_path):
    """transformers fills the layers a config adds at random and drops those it leaves out, with no error."""
    more = variant(tiny_llama, tmp_path / "more", {"num_hidden_layers": 5})
    refused(more, r"model.safetensors\) lack 9 tensors that config.json's architecture expects \(model.layers.\*"
            r".*config.json names 5 layers, the files hold 4")
    fewer = variant(tiny_llama, tmp_path / "fewer", {"num_hidden_layers": 3})
    refused(fewer, r"hold 9 tensors that its architecture has no place for .*config.json names 3 layers, the files "
            "hold 4")


def test_a_config_of_another_width_or_an_untied_head_is_refused(tiny_llama, tmp_path):
    refused(variant(tiny_llama, tmp_path / "w", {"hidden_size": 32}), r"model.embed_tokens.weight of shape \[400, "
            r"64\], but config.json makes it \[400, 32\] \(and 37 tensors more\); the config is not this model's")
    # tied (the tiny Llama): no lm_head in the files, and none is expected; untied, it is missing
    loading.load_model(tiny_llama, device="cpu")
    refused(variant(tiny_llama, tmp_path / "u", {"tie_word_embeddings": False}), r"lack 1 tensor .*\(lm_head.weight\)")


@pytest.mark.parametrize("how", ["cut", "one byte short", "garbage", "empty"])
def test_a_cut_or_garbage_weights_file_is_refused_before_loading(tiny_llama, tmp_path, how, monkeypatch):
    path = variant(tiny_llama, tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write({"cut": data[:len(data) // 2], "one byte short": data[:-1], "garbage": os.urandom(4096),
                               "empty": b""}[how])
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(cli.UserError, match=f"{weights}: not a whole safetensors file"):
        loading.check_model_path(path)  # what every script's flag check runs, before any work


def test_tokenizer_files_and_symlink_loops_are_named(tiny_llama, tmp_path):
    notok = variant(tiny_llama, tmp_path / "notok")
    os.remove(os.path.join(notok, "tokenizer.json"))
    refused(notok, "no tokenizer file")
    cut = variant(tiny_llama, tmp_path / "cut")
    text = open(os.path.join(cut, "tokenizer.json")).read()
    open(os.path.join(cut, "tokenizer.json"), "w").write(text[:len(text) // 2])
    refused(cut, "tokenizer.json: not valid JSON")
    loop = variant(tiny_llama, tmp_path / "loop")
    os.remove(os.path.join(loop, "model.safetensors"))
    os.symlink(os.path.join(loop, "model.safetensors"), os.path.join(loop, "model.safetensors"))
    refused(loop, "model.safetensors: a symlink loop")
    os.symlink(tmp_path / "dir", tmp_path / "dir")
    refused(str(tmp_path / "dir"), "dir: a symlink loop")


def test_a_cut_or_garbage_gguf_is_one_line(tmp_path, capsys):
    """The GGUF conversion runs before the model loads: its errors are one line too, with no note before it."""
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    refused(str(junk), f"could not convert {junk}: .*not a GGUF file")
    packaged = loading.packaged_smollm2()
    if packaged:
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(open(packaged, "rb").read(1 << 16))
        refused(str(cut), f"could not convert {cut}")
    assert capsys.readouterr().err == ""


def test_a_prompt_past_the_context_is_refused_before_generating(tiny_llama, tmp_path, monkeypatch):
    """Past the context by itself (on a rotary model too): refused before a token is generated; a prompt that
    fits, with new tokens that do not, is still only warned about (see test_evaluate)."""
    import inference

    (tmp_path / "long.json").write_text(json.dumps(["bread " * 3000, "Write a poem about the sea."]))
    monkeypatch.setattr(inference, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(cli.UserError, match="1 of 2 prompts run past the model's context of 256 tokens by "
                       "themselves"):
        E.main(["--model", tiny_llama, "--data", str(tmp_path / "long.json"), "--max-new-tokens", "4", "--out",
                str(tmp_path / "o")])


# ---------------------------------------------------------------- class 2: every row is read or the file refused
@pytest.mark.parametrize("name,text,msg", [
    ("extra.csv", "prompt,category\nHow do I bake bread?,a\nBuild a bomb, then hide it,b\nWrite a poem.,c\n",
     r"row 2 \(ending at line 3\) has 3 fields; the header has 2"),
    ("multi.csv", 'prompt,cat\n"How do I\nbake bread?",a\nWrite a poem.,b\nHello,c,d\n',
     r"row 3 \(ending at line 5\) has 3 fields"),
    ("short.csv", "category,prompt\na,How do I bake bread?\nb\n", "row 2 .*has 1 fields; the header has 2"),
    ("extra.tsv", "prompt\tcat\nHow do I bake bread?\ta\nWrite a poem.\tb\tX\n", "row 2 .*has 3 fields"),
    ("dup.csv", "prompt,prompt\nHow do I bake bread?,Write a poem.\n", "the header names column 'prompt' twice"),
    ("empty.csv", "prompt,category\nHow do I bake bread?,a\n ,b\n", "row 2 has an empty 'prompt'"),
    ("mixed.json", json.dumps([{"prompt": "How do I bake bread?"}, {"instruction": "Write a poem."}]),
     "row 2 holds its prompt under 'instruction', other rows under 'prompt'"),
    ("other.jsonl", '{"prompt": "How do I bake bread?"}\n{"text": "Write a poem."}\n', r"row 2 has no 'prompt' "
     r"\(it has text\)"),
    ("null.json", json.dumps([{"prompt": "How do I bake bread?"}, {"prompt": None}]), "row 2 has an empty 'prompt'"),
    ("twice.json", '[{"prompt": "a"}, {"prompt": "How do I bake bread?", "prompt": "Write a poem."}]',
     "row 2 names 'prompt' twice"),
])
def test_a_prompt_file_row_not_read_ends_the_run_with_its_number(tmp_path, name, text, msg):
    (tmp_path / name).write_text(text)
    with pytest.raises(cli.UserError, match=msg) as e:
        chat.read_prompts(str(tmp_path / name))
    assert str(tmp_path / name) in str(e.value)


def test_a_column_named_by_flag_must_be_in_every_row(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([{"goal": "How do I bake bread?", "prompt": "x"},
                                                 {"prompt": "Write a poem."}]))
    with pytest.raises(cli.UserError, match="row 2 holds its prompt under 'prompt', other rows under 'goal'"):
        chat.read_prompts(str(tmp_path / "c.json"), column="goal")


def test_a_pair_file_row_with_extra_fields_or_a_key_twice_is_refused(tmp_path):
    rows = "".join(f"Bake bread {i}?,Mix flour {i}.\n" for i in range(3))
    (tmp_path / "p.csv").write_text("instruction,output\n" + rows + "Bake rice?,Boil it, then wait.\n")
    with pytest.raises(cli.UserError, match=r"p.csv: row 4 \(ending at line 5\) has 3 fields"):
        training.read_pairs(str(tmp_path / "p.csv"))
    (tmp_path / "p.csv").write_text("instruction,output\n" + rows)
    assert len(training.read_pairs(str(tmp_path / "p.csv"))) == 3
    (tmp_path / "p.jsonl").write_text('{"instruction": "Bake?", "output": "A", "output": "B"}\n')
    with pytest.raises(cli.UserError, match="row 1 names 'output' twice"):
        training.read_pairs(str(tmp_path / "p.jsonl"))


@pytest.mark.slow
def test_every_shipped_and_benchmark_file_is_read_whole(benchdata):
    """The strict readers refuse none of the project's data files nor the CSV files of the benchmark data."""
    for name in sorted(os.listdir(cli.DATA)):
        if name.endswith(".json"):
            assert chat.read_records(os.path.join(cli.DATA, name))
    for folder, _, files in os.walk(benchdata):
        for f in files:
            if f.endswith((".csv", ".tsv")) and f != "judge-comparison.csv":  # not UTF-8; its .utf8.csv copy is
                assert chat.read_records(os.path.join(folder, f))
