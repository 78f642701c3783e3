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

import actor as A
import directions as D
import evaluate as E
import plumbing as pl
import procon as P
import rundir
from conftest import ROOT, snapshot


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
    with pytest.raises(pl.UserError, match="boom"):
        with rundir.run_folder(out, ("a.txt",), overwrite=True) as work:
            open(os.path.join(work, "a.txt"), "w").write("second")
            pl.fail("boom")
    assert snapshot(out) == before and not os.path.exists(os.path.join(out, rundir.WORK))


def test_one_writer_per_folder(tmp_path):
    out = str(tmp_path / "o")
    os.makedirs(out)
    held = rundir.lock(out)
    try:
        with pytest.raises(pl.UserError, match=f"{out} is being written by another run \\(pid {os.getpid()}"):
            with rundir.run_folder(out, ("a.txt",)):
                pass
    finally:
        rundir.unlock(held)
    with rundir.run_folder(out, ("a.txt",)) as work:  # free again once the other run is done
        open(os.path.join(work, "a.txt"), "w").write("x")


def test_checkpoints_survive_a_kill_at_every_step(tmp_path, monkeypatch):
    """A kill at any moment of save_checkpoint (while its files are written, or at the rename that makes it whole)
    leaves the last whole checkpoint; a half-written one is never taken."""
    work = str(tmp_path)

    def write(step, die_after=None):
        def fill(folder):
            for i, n in enumerate(("w", "state")):
                open(os.path.join(folder, n), "w").write(str(step))
                if die_after == i:
                    raise KeyboardInterrupt
        return fill
    rundir.save_checkpoint(work, 1, write(1))
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint(work, 2, write(2, die_after=0))
    assert rundir.last_checkpoint(work)[0] == 1

    def die(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint(work, 2, write(2))
    monkeypatch.undo()
    step, folder = rundir.last_checkpoint(work)
    assert step == 1 and open(os.path.join(folder, "w")).read() == "1"
    rundir.save_checkpoint(work, 2, write(2))
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
        with pytest.raises(pl.UserError, match="is being written by another run"):
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
    monkeypatch.setattr(pl, "save_json", full)
    with pytest.raises(SystemExit) as e:
        pl.run_main(lambda: main(argv + ["--overwrite"]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines[-1] == "error: No space left on device (somewhere); earlier outputs are kept"
    assert "Traceback" not in "\n".join(lines) and snapshot(tmp_path / "o") == before


@pytest.mark.parametrize("name", NAMES)
def test_a_template_without_a_system_role_is_one_line(tiny_llama, files, tmp_path, name):
    from test_directions import REJECTS_SYSTEM

    (tmp_path / "t.jinja").write_text(REJECTS_SYSTEM)
    main, argv = scripts(tiny_llama, files, tmp_path / "o")[name]
    with pytest.raises(pl.UserError, match=r"the chat template does not take a system prompt \(System role not"):
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

    neox, _ = pl.load_model(tiny_neox)
    get_peft_model(neox, LoraConfig(r=2, target_modules=["query_key_value"])).save_pretrained(str(tmp_path / "a"))
    with pytest.raises(pl.UserError, match="which .*tiny-llama.* does not have"):
        P.main(["--merge", str(tmp_path / "a"), "--model", tiny_llama, "--out", str(tmp_path / "m")])
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "a" / "adapter_model.safetensors").read_bytes()[:100])  # a merge of an adapter cut short
    with pytest.raises(pl.UserError, match="damaged or not a safetensors file"):
        P.main(["--merge", str(tmp_path / "a"), "--out", str(tmp_path / "m")])
    main, argv = scripts(tiny_llama, files, tmp_path / "p")["actor"]
    main(argv)
    with pytest.raises(pl.UserError, match=f"was made on {tiny_llama} \\(llama\\), not on {tiny_neox}"):
        A.main(["--merge", str(tmp_path / "p"), "--model", tiny_neox, "--out", str(tmp_path / "m2")])
    assert not (tmp_path / "m").exists() or snapshot(tmp_path / "m") == {}


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
import plumbing as pl, {module} as m
pl.run_main(lambda: m.main({argv!r}))
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
