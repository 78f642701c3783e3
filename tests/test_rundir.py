"""The mechanisms every script shares for its --out (rundir.py) and for what a user's machine can do to a run: one
writer per folder, outputs committed at once (a kill at any write leaves the earlier outputs or the new ones, never a
mix), checkpoints that a kill cannot break, a full disk, a chat template that rejects the system role; each shown on
all four scripts."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, snapshot

import actor as A
import cli
import directions as D
import evaluate as E
import inference
import loading
import procon as P
import rundir
import runrecord


# ---------------------------------------------------------------------------- the mechanisms themselves
def test_commit_replaces_the_whole_set_and_a_cut_commit_rolls_forward(tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    with rundir.run_folder(out, ("a.txt", "b"), known=("a.txt", "b", "old.txt")) as work:
        open(os.path.join(work, "a.txt"), "w").write("first")
        os.makedirs(os.path.join(work, "b"))
        open(os.path.join(work, "b", "x"), "w").write("first")
    open(os.path.join(out, "old.txt"), "w").write("another mode's output")
    assert rundir.manifest(out) == ["a.txt", "b"]
    replace, calls = os.replace, []

    def replace_then_die(src, dst):  # the commit is cut after its journal and one move
        replace(src, dst)
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        with rundir.run_folder(out, ("a.txt", "b"), overwrite=True, known=("a.txt", "b", "old.txt")) as work:
            open(os.path.join(work, "a.txt"), "w").write("second")
            os.makedirs(os.path.join(work, "b"))
            open(os.path.join(work, "b", "x"), "w").write("second")
    monkeypatch.undo()
    assert os.path.isfile(os.path.join(out, rundir.WORK, rundir.COMMIT))  # a mix on disk, and its journal
    rundir.settle(out)  # what every script and every artifact loader does first
    assert snapshot(out) == {"a.txt": b"second", "b/x": b"second", ".outputs.json": snapshot(out)[".outputs.json"]}
    assert not os.path.exists(os.path.join(out, rundir.WORK))


def test_a_failed_run_leaves_the_earlier_outputs(tmp_path):
    out = str(tmp_path / "o")
    with rundir.run_folder(out, ("a.txt",)) as work:
        open(os.path.join(work, "a.txt"), "w").write("first")
    before = snapshot(out)
    with pytest.raises(cli.UserError, match="boom"):
        with rundir.run_folder(out, ("a.txt",), overwrite=True) as work:
            open(os.path.join(work, "a.txt"), "w").write("second")
            cli.fail("boom")
    assert snapshot(out) == before and not os.path.exists(os.path.join(out, rundir.WORK))


def test_one_writer_per_folder(tmp_path):
    out = str(tmp_path / "o")
    os.makedirs(out)
    held = rundir.lock(out)
    try:
        with pytest.raises(cli.UserError, match=f"{out} is being written by another run \\(pid {os.getpid()}"):
            with rundir.run_folder(out, ("a.txt",)):
                pass
    finally:
        rundir.unlock(held)
    with rundir.run_folder(out, ("a.txt",)) as work:  # free again once the other run is done
        open(os.path.join(work, "a.txt"), "w").write("x")


def test_checkpoints_survive_a_kill_at_every_step(tmp_path, monkeypatch):
    """A kill at any moment of write_checkpoint (while its files are written, or at the rename that makes it whole)
    leaves the last whole checkpoint; a half-written one is never taken."""
    work = str(tmp_path)

    def write(step, die_after=None):
        def fill(folder):
            for i, n in enumerate(("w", "state")):
                open(os.path.join(folder, n), "w").write(str(step))
                if die_after == i:
                    raise KeyboardInterrupt
        return fill
    rundir.write_checkpoint(work, 1, write(1))
    with pytest.raises(KeyboardInterrupt):
        rundir.write_checkpoint(work, 2, write(2, die_after=0))
    assert rundir.last_checkpoint(work)[0] == 1

    def die(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        rundir.write_checkpoint(work, 2, write(2))
    monkeypatch.undo()
    step, folder = rundir.last_checkpoint(work)
    assert step == 1 and open(os.path.join(folder, "w")).read() == "1"
    rundir.write_checkpoint(work, 2, write(2))
    assert rundir.last_checkpoint(work)[0] == 2 and [s for s, _ in rundir.checkpoints(work)] == [2]


# ---------------------------------------------------------------------------- each class, on every script
def scripts(tiny, files, out):
    """A short run of each script on a tiny model: (main, argv)."""
    q = ["--model", tiny, "--out", str(out)]
    return {
        "directions": (D.main, q + ["--harmful", files["harmful"], "--harmless", files["harmless"], "--layer", "1",
                                    "--n-val", "2"]),
        "actor": (A.main, q + ["--harmful", files["harmful"], "--harmless", files["harmless"], "--pseudo-harmful",
                               files["pseudo"], "--layer", "1", "--epochs", "1", "--limit", "6"]),
        "procon": (P.main, q + ["--data", files["pairs"], "--harmful", files["harmful"], "--harmless",
                                files["harmless"], "--probe-harmful", files["harmful"], "--probe-harmless",
                                files["harmless"], "--alpha", "0.3", "--epochs", "2", "--batch-size", "4",
                                "--max-length", "48"]),
        "evaluate": (E.main, q + ["--data", files["harmful"], "--limit", "4", "--max-new-tokens", "3",
                                  "--batch-size", "2"]),
    }


@pytest.fixture(scope="module")
def files(prompt_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("rundir")
    (d / "pairs.json").write_text(json.dumps([{"instruction": f"Bake bread {i}", "output": f"Mix flour {i}."}
                                              for i in range(8)]))
    (d / "pseudo.json").write_text(json.dumps([f"How do I kill a Python process {i}?" for i in range(8)]))
    return {**prompt_files, "pairs": str(d / "pairs.json"), "pseudo": str(d / "pseudo.json")}


NAMES = ("directions", "actor", "procon", "evaluate")


@pytest.mark.parametrize("name", NAMES)
def test_a_second_writer_is_refused_in_one_line(tiny_llama, files, tmp_path, name):
    main, argv = scripts(tiny_llama, files, tmp_path / "o")[name]
    os.makedirs(tmp_path / "o")
    held = rundir.lock(str(tmp_path / "o"))
    try:
        with pytest.raises(cli.UserError, match="is being written by another run"):
            main(argv)
    finally:
        rundir.unlock(held)
    assert snapshot(tmp_path / "o") == {}


@pytest.mark.parametrize("name", NAMES)
def test_a_full_disk_is_one_line_and_keeps_the_earlier_outputs(tiny_llama, files, tmp_path, monkeypatch, capsys,
                                                                name):
    main, argv = scripts(tiny_llama, files, tmp_path / "o")[name]
    main(argv)
    before = snapshot(tmp_path / "o")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "somewhere")
    monkeypatch.setattr(runrecord, "save_json", full)
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: main(argv + ["--overwrite"]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines[-1] == "error: No space left on device (somewhere); any earlier outputs are kept"
    assert "Traceback" not in "\n".join(lines) and snapshot(tmp_path / "o") == before


@pytest.mark.parametrize("name", NAMES)
def test_a_template_without_a_system_role_is_one_line(tiny_llama, files, tmp_path, name):
    from test_directions import REJECTS_SYSTEM

    (tmp_path / "t.jinja").write_text(REJECTS_SYSTEM)
    main, argv = scripts(tiny_llama, files, tmp_path / "o")[name]
    with pytest.raises(cli.UserError, match=r"the chat template does not take a system prompt \(System role not"):
        main(argv + ["--chat-template", str(tmp_path / "t.jinja"), "--system-prompt", "Be brief."])
    assert not (tmp_path / "o" / rundir.WORK).exists()


def test_overwrite_in_another_mode_leaves_no_file_of_the_earlier_run(tiny_llama, files, tmp_path):
    """An --overwrite run replaces the whole earlier set: a search's files beside a plain ACTOR run, a full model
    beside an adapter, Surgical's vector beside a plain direction."""
    import actor_search

    q = ["--model", tiny_llama, "--harmful", files["harmful"], "--harmless", files["harmless"], "--pseudo-harmful",
         files["pseudo"], "--epochs", "1", "--limit", "6"]
    actor_search.main(q + ["--out", str(tmp_path / "a"), "--search-layers", "1", "--alphas", "1", "--lrs", "1e-3",
                           "--coeffs", "0.5", "--tolerance", "100"])
    A.main(q + ["--out", str(tmp_path / "a"), "--layer", "1", "--overwrite"])
    assert sorted(snapshot(tmp_path / "a")) == sorted([".outputs.json", *A.OUTPUTS])
    main, argv = scripts(tiny_llama, files, tmp_path / "p")["procon"]
    main(argv)
    main(argv + ["--full", "--overwrite"])
    assert os.path.isdir(tmp_path / "p" / "model") and not os.path.exists(tmp_path / "p" / "adapter")
    main, argv = scripts(tiny_llama, files, tmp_path / "d")["directions"]
    main(argv + ["--pseudo-harmful", files["pseudo"]])
    main(argv + ["--overwrite"])
    assert not (tmp_path / "d" / "false_refusal.pt").exists() and (tmp_path / "d" / "direction.pt").exists()


def test_merge_refuses_an_adapter_or_patch_of_another_model(tiny_llama, tiny_neox, files, tmp_path):
    from peft import LoraConfig, get_peft_model

    neox, _ = loading.load_model(tiny_neox)
    get_peft_model(neox, LoraConfig(r=2, target_modules=["query_key_value"])).save_pretrained(str(tmp_path / "a"))
    with pytest.raises(cli.UserError, match="which .*tiny-llama.* does not have"):
        P.main(["--merge", str(tmp_path / "a"), "--model", tiny_llama, "--out", str(tmp_path / "m")])
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "a" / "adapter_model.safetensors").read_bytes()[:100])  # a merge of an adapter cut short
    with pytest.raises(cli.UserError, match="damaged or not a safetensors file"):
        P.main(["--merge", str(tmp_path / "a"), "--out", str(tmp_path / "m")])
    main, argv = scripts(tiny_llama, files, tmp_path / "p")["actor"]
    main(argv)
    with pytest.raises(cli.UserError, match=f"was made on {tiny_llama} \\(llama\\), not on {tiny_neox}"):
        A.main(["--merge", str(tmp_path / "p"), "--model", tiny_neox, "--out", str(tmp_path / "m2")])
    assert not (tmp_path / "m").exists() or snapshot(tmp_path / "m") == {}


def test_exports_never_overwrite_what_they_read(files, tmp_path):
    """--out of a merge or an export is refused when it is the base model the artifact records (no --model given),
    the model, or the folder of the direction it reads: an --overwrite there would replace its own input."""
    from conftest import build_tiny

    m = build_tiny(tmp_path / "m", "llama")
    main, argv = scripts(m, files, tmp_path / "a")["actor"]
    main(argv)
    main, argv = scripts(m, files, tmp_path / "d")["directions"]
    main(argv)
    before = {k: snapshot(tmp_path / k) for k in ("m", "a", "d")}
    with pytest.raises(cli.UserError, match="is what the base model reads"):
        A.main(["--merge", str(tmp_path / "a"), "--out", m, "--overwrite"])
    with pytest.raises(cli.UserError, match="is what --model reads"):
        D.main(["--model", m, "--ablate-weights", str(tmp_path / "d" / "direction.pt"), "--out", m, "--overwrite"])
    with pytest.raises(cli.UserError, match="holds .*direction.pt, which --ablate-weights reads"):
        D.main(["--model", m, "--ablate-weights", str(tmp_path / "d" / "direction.pt"), "--out", str(tmp_path / "d"),
                "--overwrite"])
    assert {k: snapshot(tmp_path / k) for k in ("m", "a", "d")} == before


def test_every_output_folder_names_what_its_run_reads():
    """Every rundir.run_folder of the scripts is given the files and folders its run reads (read=), so that the check
    of inputs against --out covers every mode of every script."""
    import ast

    for name in ("actor.py", "actor_search.py", "directions.py", "procon.py", "evaluate.py", "artifacts.py"):
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, name)).read())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("run_folder", "rank0_run_folder"):
                assert "read" in {k.arg for k in node.keywords}, f"{name}:{node.lineno} run_folder without read="


# ---------------------------------------------------------------------------- kills, in fresh processes
KILLER = """
import os, sys
sys.path.insert(0, {root!r})
n, calls, replace = {n}, [], os.replace
def replace_then_die(src, dst):
    replace(src, dst)
    calls.append(dst)
    if len(calls) == n:
        os._exit(9)  # killed: no handler, no cleanup
os.replace = replace_then_die
import cli, {module} as m
cli.run_main(lambda: m.main({argv!r}))
"""


def killed_at(n, module, argv):
    """Run module.main(argv) in a fresh process that is killed right after its n-th os.replace; its exit status."""
    code = KILLER.format(root=ROOT, n=n, module=module, argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).returncode


def whole(folder, names):
    """The outputs in a folder, read as what they are (a cut file fails to read)."""
    from safetensors.torch import load_file

    out = {}
    for n in names:
        path = os.path.join(folder, n)
        for p in ([path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]):
            if p.endswith(".json") or p.endswith(".jsonl"):
                out[p] = [json.loads(line) for line in open(p)] if p.endswith(".jsonl") else json.load(open(p))
            elif p.endswith(".pt"):
                out[p] = torch.load(p, weights_only=True)
            elif p.endswith(".safetensors"):
                out[p] = load_file(p)
            else:
                out[p] = open(p, "rb").read()
    return out


@pytest.mark.slow  # about 30 fresh processes
@pytest.mark.parametrize("name", NAMES)
def test_a_kill_at_any_write_leaves_old_or_new_outputs_and_resume_continues(tiny_llama, files, tmp_path, name):
    """A first run's outputs; then a second (--overwrite, other settings) killed after its 1st, 2nd, ... os.replace:
    the folder, as the next opener settles it, holds exactly the first run's outputs or the second's, whole. Where the
    script resumes (procon.py, evaluate.py), --resume from what the kill left ends with the uninterrupted run's
    outputs."""
    main, argv = scripts(tiny_llama, files, tmp_path / "ref")[name]
    other = {"directions": ["--layer", "2"], "actor": ["--layer", "2"], "procon": ["--alpha", "0.5"],
             "evaluate": ["--limit", "6"]}[name]
    main(argv + other)  # the uninterrupted second run, for reference
    names = [n for n in rundir.manifest(str(tmp_path / "ref"))]
    reference = snapshot(tmp_path / "ref")
    out = tmp_path / "o"
    argv = [str(out) if a == str(tmp_path / "ref") else a for a in argv]
    main(argv)
    first = snapshot(out)
    for n in range(1, 40):
        status = killed_at(n, name, argv + other + ["--overwrite"])
        rundir.settle(str(out))
        now = snapshot(out)
        if status == 0:  # the whole run took fewer writes: every cut has been tried
            break
        assert status == 9
        outputs = {k: v for k, v in now.items() if not k.startswith(".")}
        if outputs == {k: v for k, v in first.items() if not k.startswith(".")}:
            state = "old"
        else:
            assert sorted(rundir.manifest(str(out))) == sorted(names), f"a mix after write {n}"
            whole(str(out), names)  # every output reads
            state = "new"
        resumable = name in ("procon", "evaluate") and rundir.has_progress(str(out / rundir.WORK),
                                                                           ("responses.jsonl",))
        main(argv + other + (["--resume"] if resumable else ["--overwrite"]))
        if name in ("procon", "evaluate"):  # deterministic outputs: the same as the uninterrupted run's
            key = "adapter/adapter_model.safetensors" if name == "procon" else "responses.jsonl"
            assert snapshot(out)[key] == reference[key], f"after a kill at write {n} ({state})"
        main(argv + ["--overwrite"])  # back to the first run's outputs for the next cut
        first = snapshot(out)
    assert n > 3


# ---------------------------------------------------------------------------- identity by contents (issue 27)
def test_a_digest_is_computed_once_per_file_version(tmp_path, monkeypatch):
    """runrecord.sha256 reads a file once per version (path, inode, size, mtime, ctime), in this process and, for large
    files, across processes (CACHE/digests.json); a file rewritten in place with its mtime set back is read again
    (ctime), and a file changed within DIGEST_RACY seconds is not kept at all."""
    import builtins

    monkeypatch.setattr(runrecord, "CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runrecord, "_DIGESTS", {})
    monkeypatch.setattr(runrecord, "DIGEST_KEEP", 4)
    path = tmp_path / "w.bin"
    path.write_bytes(b"aaaa")
    reads, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (reads.append(f) if str(f) == str(path) else None)
                        or real_open(f, *a, **k))
    first = runrecord.sha256(str(path))
    assert runrecord.sha256(str(path)) == first and len(reads) == 2  # changed just now: racy, so read again, not kept
    monkeypatch.setattr(runrecord, "DIGEST_RACY", 0.0)
    assert runrecord.sha256(str(path)) == first and runrecord.sha256(
        str(path)) == first and len(reads) == 3  # kept from now on
    assert first in json.load(real_open(tmp_path / "cache" / "digests.json")).values()
    monkeypatch.setattr(runrecord, "_DIGESTS", {})  # another process: the large file's digest comes from the cache
    assert runrecord.sha256(str(path)) == first and len(reads) == 3
    stat = os.stat(path)
    path.write_bytes(b"bbbb")  # the same size, and its mtime set back: only ctime tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert runrecord.sha256(str(path)) == runrecord.sha256_of("bbbb") != first and len(reads) == 4


def test_a_model_is_known_by_its_contents(tiny_llama, tmp_path, monkeypatch):
    """runrecord.model_identity: a model folder by its files' digests, whatever path names it; a copy is the same model;
    the same folder with other weights is not, and model_change names the file; documentation does not count."""
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "m")
    shutil.copytree(tiny_llama, tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    a, b, c = runrecord.model_identity("./m/"), runrecord.model_identity(
        str(tmp_path / "m")), runrecord.model_identity("copy")
    assert a["key"] == b["key"] == str(tmp_path / "m") and a["sha256"] == b["sha256"] == c["sha256"]
    assert "model.safetensors" in a["files"] and "config.json" in a["files"]
    assert runrecord.model_change(a, c) is None  # a copy elsewhere: the same model
    (tmp_path / "m" / "README.md").write_text("notes")
    assert runrecord.model_change(a, runrecord.model_identity("m")) is None
    model = loading.load_model("m")[0]
    with torch.no_grad():
        next(model.parameters()).mul_(2)
    model.save_pretrained("m")
    assert runrecord.model_change(a, runrecord.model_identity("m")) == "model.safetensors changed"
    assert runrecord.model_change(runrecord.model_identity("m"), c) == "another model"
    hub = runrecord.model_identity("no-such-org/no-such-model")
    assert hub["sha256"] is None and runrecord.model_change(hub, "no-such-org/no-such-model") is None
    assert runrecord.model_change(str(tmp_path / "m"), a) is None  # an older run's setting, a bare path: by its key


def test_a_resume_takes_the_same_model_by_any_path_or_copy(tiny_llama, files, tmp_path, monkeypatch):
    """evaluate.py killed after one batch on model folder m; m's weights then replaced: the resume is refused, naming
    the file; a copy of what m held, named by another form of path (./copy/), continues the run."""
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    argv = ["--data", files["harmful"], "--limit", "6", "--max-new-tokens", "3", "--batch-size", "2", "--out", "o"]
    generate = inference.generate

    def dying(*args, on_batch=None, **kwargs):
        def save(idx, responses):
            on_batch(idx, responses)
            raise KeyboardInterrupt
        return generate(*args, on_batch=save, **kwargs)
    monkeypatch.setattr(inference, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        E.main(["--model", "m"] + argv)
    monkeypatch.setattr(inference, "generate", generate)
    shutil.copytree("m", "copy")
    model = loading.load_model("m")[0]
    with torch.no_grad():
        next(model.parameters()).mul_(2)
    model.save_pretrained("m")
    with pytest.raises(cli.UserError) as e:
        E.main(["--model", "m", "--resume"] + argv)
    assert str(e.value) == ("--resume with --model m, which is not the model the run in o began with "
                            "(model.safetensors changed); use that one, or start again with --overwrite")
    E.main(["--model", "./copy/", "--resume"] + argv)  # the copy holds what m held when the run began
    assert len(open("o/responses.jsonl").read().splitlines()) == 6


# ---------------------------------------------------------------------------- inputs are never outputs (issue 27)
@pytest.mark.parametrize("relation", ("model", "inside-model", "holds-data"))
@pytest.mark.parametrize("name", NAMES)
def test_out_is_never_a_file_or_folder_the_run_reads(tiny_llama, files, tmp_path, monkeypatch, name, relation):
    """--out as the model folder, inside it, or holding the data files: refused before anything is loaded or made."""
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "m")
    data = os.path.dirname(files["harmful"])
    out = {"model": str(tmp_path / "m"), "inside-model": str(tmp_path / "m" / "runs" / "x"), "holds-data": data}[
        relation]
    main, argv = scripts(str(tmp_path / "m"), files, out)[name]
    before = snapshot(tmp_path / "m"), snapshot(data)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    expected = {"model": f"--out {out} is what --model reads; choose another --out",
                "inside-model": f"--out {out} is inside {tmp_path / 'm'}, which --model reads; choose an --out outside "
                                "it",
                "holds-data": f"--out {out} holds {files['harmful']}, which --harmful reads"}[relation]
    if relation == "holds-data" and name == "evaluate":
        expected = f"--out {out} holds {files['harmful']}, which --data reads"
    with pytest.raises(cli.UserError) as e:
        main(argv + ["--overwrite"])
    assert str(e.value).startswith(expected)
    assert (snapshot(tmp_path / "m"), snapshot(data)) == before and not os.path.exists(tmp_path / "m" / "runs")


# ---------------------------------------------------------------------------- every write error is one line (issue 27)
def raises(error):
    def writer(*args, **kwargs):
        raise error
    return writer


@pytest.mark.parametrize("name", NAMES)
def test_a_library_write_error_is_one_line_and_leaves_no_temporary(tiny_llama, files, tmp_path, monkeypatch, capsys,
                                                                   name):
    """A full disk as each library reports it (safetensors' SafetensorError, torch.save's RuntimeError, an OSError from
    a JSON write), where each script writes: one line naming the file, exit 2, earlier outputs kept, no temporary."""
    import safetensors
    import safetensors.torch

    main, argv = scripts(tiny_llama, files, tmp_path / "o")[name]
    with rundir.run_folder(str(tmp_path / "o"), ("earlier.json",)) as work:  # an earlier run's outputs
        open(os.path.join(work, "earlier.json"), "w").write("{}")
    before = snapshot(tmp_path / "o")
    full = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    if name == "directions":  # direction.pt: torch.save
        monkeypatch.setattr(torch, "save", raises(RuntimeError("PytorchStreamWriter failed writing file data/0: file "
                                                               "write failed")))
        target, why = "direction.pt", "PytorchStreamWriter failed writing file data/0: file write failed"
    elif name == "actor":  # the patch: safetensors
        monkeypatch.setattr(safetensors.torch, "save_file", raises(safetensors.SafetensorError(full)))
        target, why = "actor_layer.safetensors", "No space left on device"
    elif name == "procon":  # a checkpoint's optimizer state: torch.save
        save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: raises(RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"))() if "optimizer" in str(f) else
            save(obj, f, *a, **k))
        target, why = "checkpoint-0000002", "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"
    else:  # summary.json: the file system's own error, as the atomic rename meets it
        replace = os.replace
        monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(
            errno.ENOSPC), src)) if dst.endswith("summary.json") else replace(src, dst))
        target, why = "summary.json", "No space left on device"
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: main(argv + ["--overwrite"]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith("error: could not write ") and lines[-1].endswith(
        f"{target} ({why}); any earlier outputs are kept"), lines[-1]
    after = {k: v for k, v in snapshot(tmp_path / "o").items() if not k.startswith(rundir.WORK)}
    assert after == before
    assert not [f for _, _, fs in os.walk(tmp_path / "o") for f in fs if f.endswith(".tmp")]
    assert not [d for _, ds, _ in os.walk(tmp_path / "o") for d in ds if d.endswith(".tmp")]


# ---------------------------------------------------------------------------- finite on the way out (issue 27)
def test_json_outputs_are_strict(tmp_path, capsys):
    """Every JSON and JSONL the scripts write: no NaN, no Infinity; such a number is written as null, named in the
    object's non_finite list and in a warning."""
    runrecord.save_json(str(tmp_path / "a.json"), {"loss": [1.0, float("nan")], "score": {"x": float("-inf")}, "n": 3})
    text = (tmp_path / "a.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": [1.0, None], "score": {"x": None}, "n": 3, "non_finite": ["loss[1]", "score.x"]}
    E.save_jsonl(str(tmp_path / "b.jsonl"), [{"s": float("inf")}, {"s": 1.5}])
    assert [json.loads(line) for line in open(tmp_path / "b.jsonl")] == [{"s": None, "non_finite": ["s"]}, {"s": 1.5}]
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'a.json'}: 2 NaN or infinite numbers written as null (loss[1], score.x)" in err


@pytest.mark.parametrize("argv,expected", [
    (["procon.py", "--alpha", "1e30"], "--alpha 1e+30 (else --lr 0.0002)"),
    (["procon.py", "--alpha", "0.01", "--warmup-epochs", "1", "--warmup-alpha", "1e30"],
     "--warmup-alpha 1e+30 (else --lr 0.0002, --alpha 0.01)"),
    (["procon.py", "--lr", "1e3"], "--lr 1000 (else --warmup-alpha"),  # without --warmup-epochs it is not in effect
    (["actor_search.py", "--coeffs", "0.5,1e30"], "--coeffs 1e+30 (else --lrs 0.002, --alphas 1)"),
    (["evaluate.py", "--steer", "d.pt", "--coeff=-1e30", "--data", "x"], "--coeff 1e+30 (else what --steer applies)"),
])
def test_a_non_finite_number_names_the_likely_flag(argv, expected):
    """check_finite names the flags of the run most likely to blame, the largest against its usual scale first, and
    only those in effect."""
    import actor_search

    {"procon.py": P.parse_args, "actor_search.py": actor_search.parse_args, "evaluate.py": E.parse_args}[argv[0]](
        argv[1:])
    with pytest.raises(cli.UserError) as e:
        cli.check_finite(torch.tensor([1.0, float("nan")]), "the loss")
    if expected.endswith("--warmup-alpha"):
        assert str(e.value).startswith("the loss became NaN; the likely cause: --lr 1000 is too large")
    else:
        assert str(e.value).startswith(f"the loss became NaN; the likely cause: {expected} is too large")


def test_metadata_names_the_model_by_digest_and_the_command_as_it_ran(tiny_llama, monkeypatch):
    """Every output's metadata carries the model's digest (the artifacts' model_identity) and the command shell-quoted,
    so that an argument with a space re-runs as written."""
    import argparse
    import shlex

    monkeypatch.setattr(sys, "argv", ["procon.py", "--data", "my pairs.json", "--model", tiny_llama])
    meta = runrecord.metadata(argparse.Namespace(model=tiny_llama))
    assert shlex.split(meta["command"]) == sys.argv
    assert meta["model_sha256"] == runrecord.model_identity(tiny_llama)["sha256"] and meta["model_sha256"]
