"""rundir.py: a run's output folder, the same for every script (a black box: outputs appear whole or not at all, one
writer at a time, a resume only with the settings it began with, checkpoints that a kill cannot break).

    OUT/                   the outputs of the last run that finished, and .outputs.json (which names they are)
    OUT/.lock              held while a run writes (filelock): a second run into the same --out stops with one line
    OUT/.run/              the run in progress: settings.json (everything that shapes it), its checkpoints or partial
                           results, and the outputs it writes, which reach OUT/ only when the run succeeds
    OUT/.run/commit.json   the commit's journal, written before the first output moves: a commit cut short by a kill
                           is finished by whoever opens the folder next (it rolls forward), so OUT/ never shows a mix

A failed or killed run leaves the earlier outputs byte for byte; --overwrite replaces the whole earlier set (the files
of another mode included) only when the new run succeeds; --resume continues the run in OUT/.run/ when every setting
that shapes it (its flags, the contents of the files they name, the model's contents) is as it was, and says what
changed if not. OUT is never a file or folder the run reads, nor inside one, nor holds one (READS).
"""
import contextlib
import json
import os
import shutil
import time

import cli
import runrecord

LOCK, WORK, COMMIT, MANIFEST, SETTINGS = ".lock", ".run", "commit.json", ".outputs.json", "settings.json"
NOT_SETTINGS = ("out", "overwrite", "resume")  # flags that never shape what a run computes
# the flags, in every script, that name a file or folder the run reads (a model given as a path included)
READS = ("model", "merge", "chat_template", "data", "data_dir", "safety_data", "refusals", "eval_data", "harmful",
         "harmless", "pseudo_harmful", "probe_harmful", "probe_harmless", "patch", "adapter", "ablate", "steer",
         "direction", "exclude", "responses", "eval_refusal", "ablate_weights", "refusal_openers", "reference",
         "damage_prompts", "damage_pairs")


# ============================================================================ what shapes a run
def settings(args, files=(), ignore=()):
    """Every flag of a run (but `ignore` and NOT_SETTINGS), the flags in `files` recorded by the contents of the file
    or folder they name (a file rewritten in place is not the same file; a moved one is), and --model by its contents
    (runrecord.model_identity: its files' digests; a hub id not cached here, by its name)."""
    out = {}
    for k, v in sorted(vars(args).items()):
        if k in NOT_SETTINGS or k in ignore:
            continue
        if k in files:  # "sha256:..." of what the flag names (None: no file given)
            v = [f"sha256:{runrecord.digest(p)}"
                 for p in v] if isinstance(v, list) else v and f"sha256:{runrecord.digest(v)}"
        elif k == "model" and v:
            v = runrecord.model_identity(v)
        out[k] = v
    return json.loads(json.dumps(out, default=str))


def check_same(old, new, out):
    """A resume must find the run it continues made with the same settings; the first that differs is named."""
    for k in sorted(set(old) | set(new)):
        was, now = old.get(k), new.get(k)
        if k == "model" and was and now:  # by contents: a moved or copied model is the same, a rewritten one is not
            change = runrecord.model_change(was, now)
            if change:
                cli.fail(f"--resume with --model {now['model'] if isinstance(now, dict) else now}, which is not the "
                        f"model the run in {out} began with ({change}); use that one, or start again with --overwrite")
            continue
        if was == now:
            continue
        flag = "--" + k.replace("_", "-")
        if "sha256:" in str(was) + str(now):  # a flag that names a file: compared by contents
            if was and now:
                cli.fail(f"--resume: the file or folder of {flag} has other contents than when the run in {out} "
                        "began; use the same one, or start again with --overwrite")
            cli.fail(f"--resume {'without' if was else 'with'} {flag}, which the run in {out} began "
                    f"{'with' if was else 'without'}; use the same settings, or start again with --overwrite")
        cli.fail(f"--resume with {flag} {now!r}, but the run in {out} began with {was!r}; use the same settings, or "
                "start again with --overwrite")


# ============================================================================ the folder
def reads(args, *more):
    """(flag, path) of every file or folder that a run's flags (READS) name, and of `more` ((what, path): e.g. the
    base model a --merge artifact records), that exists here."""
    found = [(what, os.path.expanduser(p)) for what, p in more if p and os.path.exists(os.path.expanduser(p))]
    for k in READS:
        for p in (lambda v: v if isinstance(v, list) else [v])(getattr(args, k, None)):
            if p and isinstance(p, str) and os.path.exists(os.path.expanduser(p)):
                found.append(("--" + k.replace("_", "-"), os.path.expanduser(p)))
    return found


def check_not_read(out, read):
    """--out is none of the files and folders the run reads (`read`: (flag, path)), is inside none of them and holds
    none: an --overwrite there would replace or remove them, and the outputs would change what they are."""
    o = os.path.realpath(out)
    for flag, path in read:
        p = os.path.realpath(path)
        if o == p:
            cli.fail(f"--out {out} is what {flag} reads; choose another --out")
        if o.startswith(p.rstrip(os.sep) + os.sep):
            cli.fail(f"--out {out} is inside {path}, which {flag} reads; choose an --out outside it")
        if p.startswith(o.rstrip(os.sep) + os.sep):
            cli.fail(f"--out {out} holds {path}, which {flag} reads; choose an --out that does not hold it")


def lock(out):
    """Hold OUT/.lock for this process (filelock; released when it ends, however it ends), its holder written in it."""
    from filelock import FileLock, Timeout

    held = FileLock(os.path.join(out, LOCK))
    try:
        held.acquire(timeout=0)
    except Timeout:
        who = open(os.path.join(out, LOCK), encoding="utf-8").read().strip() or "another process"
        cli.fail(f"{out} is being written by another run ({who}); wait for it, or choose another --out")
    with open(os.path.join(out, LOCK), "w", encoding="utf-8") as f:
        f.write(f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}")
    return held


def unlock(held):
    held.release()


def manifest(out):
    """The names of the outputs in OUT (from its .outputs.json), [] where there is none."""
    try:
        return json.load(open(os.path.join(out, MANIFEST), encoding="utf-8"))["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def finish_commit(out):
    """Carry out the journal in OUT/.run/commit.json; every step can be repeated, so a commit cut short finishes."""
    work = os.path.join(out, WORK)
    journal = json.load(open(os.path.join(work, COMMIT), encoding="utf-8"))
    trash = os.path.join(work, ".trash")
    os.makedirs(trash, exist_ok=True)
    for name in journal["remove"]:
        remove(os.path.join(out, name))
    for name in journal["outputs"]:
        src, dst = os.path.join(work, name), os.path.join(out, name)
        if not os.path.lexists(src):
            continue  # moved before the kill
        if os.path.isdir(dst) and not os.path.islink(dst):  # a folder is swapped out first, then in
            os.replace(dst, os.path.join(trash, name))
        os.replace(src, dst)
    runrecord.save_json(os.path.join(out, MANIFEST), {"outputs": journal["outputs"]})
    shutil.rmtree(work)


def settle(folder):
    """Finish a commit that a kill cut short, before anything reads the folder (artifact loaders call this)."""
    if not os.path.isfile(os.path.join(folder, WORK, COMMIT)):
        return
    f = lock(folder)
    try:
        if os.path.isfile(os.path.join(folder, WORK, COMMIT)):
            finish_commit(folder)
    finally:
        unlock(f)


def commit(out, outputs, known):
    """The run's outputs (those of `outputs` it wrote into OUT/.run/) replace the earlier set in OUT: first the journal,
    then the moves. Earlier outputs that this run did not write (another mode's) are removed."""
    work = os.path.join(out, WORK)
    if outputs is None:  # whatever the run wrote
        outputs = sorted(n for n in os.listdir(work) if n != SETTINGS and not n.startswith("."))
    new = [n for n in outputs if os.path.lexists(os.path.join(work, n))]
    old = set(manifest(out)) | set(known)
    gone = sorted(n for n in old if n not in new and os.path.lexists(os.path.join(out, n)))
    runrecord.save_json(os.path.join(work, COMMIT), {"outputs": new, "remove": gone})
    finish_commit(out)


@contextlib.contextmanager
def run_folder(out, outputs, overwrite=False, resume=False, settings=None, known=(), resumable=False, progress=(),
               read=()):
    """The one way a script writes --out. Checked before any work: OUT is a folder this process can write, and none of
    the files and folders the run reads (`read`: (flag, path), from reads(args)) nor inside or around one; no other
    run writes it; earlier outputs are only replaced with --overwrite; an unfinished run there is continued only with
    --resume and the same settings. Yields the work folder OUT/.run/, into which the run writes everything; the names
    in `outputs` (None: all it wrote) are committed to OUT when the block ends without an error. `known`: the names
    any mode of the script writes (an --overwrite removes those of an earlier run too). resumable: the script can
    continue an unfinished run; its work folder is then kept after a failure if it holds progress (a checkpoint, or a
    non-empty file named in `progress`), else it is removed."""
    check_not_read(out, read)
    if os.path.exists(out) and not os.path.isdir(out):
        cli.fail(f"--out {out}: exists and is not a folder")
    if resume and overwrite:
        cli.fail("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    try:
        os.makedirs(out, exist_ok=True)
        held = lock(out)
    except OSError as e:
        cli.fail(f"--out {out}: not a folder this process can write ({e.strerror})")
    work = os.path.join(out, WORK)
    try:
        if os.path.isfile(os.path.join(work, COMMIT)):
            finish_commit(out)  # an earlier run was killed while committing: its commit is finished first
        unfinished = resumable and has_progress(work, progress)  # else what a dead run left is debris
        if resume and not unfinished:
            cli.fail(f"{out}: no unfinished run to resume" + (" (the last one finished)" if manifest(out) else ""))
        if unfinished and not resume and not overwrite:
            cli.fail(f"{out} holds an unfinished run; continue it with --resume, or start again with --overwrite")
        if unfinished and resume:
            try:
                then = json.load(open(os.path.join(work, SETTINGS), encoding="utf-8"))
            except (OSError, ValueError):
                cli.fail(f"{out}: the unfinished run's settings are missing or damaged; start again with --overwrite")
            check_same(then, settings or {}, out)
        else:
            existing = [n for n in dict.fromkeys(manifest(out) + list(outputs or ()) + list(known))
                        if os.path.lexists(os.path.join(out, n))]
            if existing and not overwrite:
                cli.fail(f"{os.path.join(out, existing[0])} exists; pass --overwrite to replace it or choose another "
                        "--out")
            remove(work)  # a dead run's work (a non-resumable script's, or one --overwrite starts again)
            os.makedirs(work)
            try:
                runrecord.save_json(os.path.join(work, SETTINGS), settings or {})
            except BaseException:  # a full disk: no empty work folder is left behind
                remove(work)
                raise
        try:
            yield work
        except BaseException:
            if not (resumable and has_progress(work, progress)):
                remove(work)
            raise
        commit(out, outputs, known)
    finally:
        unlock(held)


# ============================================================================ checkpoints
def has_progress(work, progress=()):
    """Whether a work folder holds something a resume can continue from: a checkpoint, or a non-empty file named in
    `progress` (evaluate.py's partial responses)."""
    return bool(checkpoints(work)) or any(os.path.isfile(os.path.join(work, n)) and
                                          os.path.getsize(os.path.join(work, n)) > 0 for n in progress)


def checkpoints(work):
    """The whole checkpoints in a work folder, oldest first: (step, path)."""
    found = []
    for name in os.listdir(work) if os.path.isdir(work) else ():
        if name.startswith("checkpoint-") and name[11:].isdigit() and os.path.isdir(os.path.join(work, name)):
            found.append((int(name[11:]), os.path.join(work, name)))
    return sorted(found)


def write_checkpoint(work, step, write):
    """write(folder) fills a new folder; it becomes checkpoint-<step> only once whole (one rename), and only then
    are the older checkpoints removed: a kill or a write error at any moment leaves the last whole checkpoint in place
    (and no half-written one)."""
    final = os.path.join(work, f"checkpoint-{step:07d}")
    tmp = final + ".tmp"
    remove(tmp)
    with runrecord.save_guard(final, tmp):  # a write error is one line, and leaves no half checkpoint
        os.makedirs(tmp)
        write(tmp)
        remove(final)
        os.replace(tmp, final)
    for _, path in checkpoints(work):
        if path != final:
            remove(path)


def last_checkpoint(work):
    """(step, folder) of the last whole checkpoint, or None."""
    found = checkpoints(work)
    return found[-1] if found else None
