"""runrecord.py: what every run records and how it writes it (black boxes, shared by every script).

Digests, computed once per file version (sha256, digest); models known by their contents (model_identity); versions
and the code's git commit (provenance); the metadata beside every output (metadata); strict JSON, torch and text
writes that are atomic and fail in one line (save_*); plots and summary tables.
"""
import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time

import torch

import cli

CACHE = os.environ.get("REFUSAL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "refusal-steering"))


# A file's digest is computed once per file version: kept by (path, device, inode, size, mtime, ctime) in this
# process, and for files of DIGEST_KEEP bytes or more (model weights) in CACHE/digests.json across runs, so a 15 GB
# model is read once, not at every run (results/identity.md: 13 s at 1.2 GB/s). ctime cannot be set back by a user
# (touch -r and cp -p set mtime only), so a file rewritten in place is hashed again. A file changed less than
# DIGEST_RACY seconds before it is hashed is not kept: a change within the same clock tick could leave every field as
# it was (git's "racy" rule).
DIGEST_KEEP, DIGEST_RACY, DIGEST_ENTRIES = 16 << 20, 2.0, 1000


_DIGESTS = {}


def sha256(path):
    """sha256 of a file's contents, computed once per file version (above)."""
    def version():
        st = os.stat(path)
        return f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}", st
    key, st = version()
    if key not in _DIGESTS and st.st_size >= DIGEST_KEEP and "_read" not in _DIGESTS:
        _DIGESTS.update(digest_cache(), _read=True)
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > DIGEST_RACY * 1e9
    if settled and version()[0] == key:  # unchanged while it was read
        _DIGESTS[key] = h.hexdigest()
        if st.st_size >= DIGEST_KEEP:
            digest_cache({key: h.hexdigest()})
    return h.hexdigest()


def digest_cache(new=None):
    """CACHE/digests.json, the digests of large files kept across runs: read, or merged with `new` and replaced at once.
    A cache that cannot be read or written is no error: it only saves time."""
    path = os.path.join(CACHE, "digests.json")
    try:
        known = json.load(open(path, encoding="utf-8"))
        known = {k: v for k, v in known.items() if isinstance(v, str)} if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    if new:
        known = dict(list({**known, **new}.items())[-DIGEST_ENTRIES:])
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(CACHE, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(known, f)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return known


def sha256_of(text):
    return hashlib.sha256(text.encode()).hexdigest()


def digest(path):
    """sha256 of a file, or of a folder's files (names and contents; hidden ones left out); None for a missing path."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return sha256(path)
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(root, n) for n in names if not n.startswith(".")]
    h = hashlib.sha256()
    for f in sorted(files):
        h.update((os.path.relpath(f, path) + sha256(f)).encode())
    return h.hexdigest()


def model_key(name):
    """One name per model, whatever it is called by: a .gguf file and its converted folder are 'gguf:<sha256[:12]>', a
    local folder is its real path (./m/x/ and m/x are one), a hub id is itself."""
    name = str(name)
    if name.endswith(".gguf") and os.path.isfile(name):
        return "gguf:" + sha256(name)[:12]
    path = os.path.realpath(os.path.expanduser(name))
    if os.path.isdir(path):
        m = re.search(r"-([0-9a-f]{12})$", path)
        if m and os.path.dirname(path) == os.path.realpath(os.path.join(CACHE, "gguf")):
            return "gguf:" + m.group(1)
        return path
    return name


NOT_MODEL = re.compile(r"^(readme|license|licence|notice|use_policy)|\.(md|png|jpe?g|gif|pdf)$", re.I)


def model_identity(name):
    """A model known by its contents: {"model": the name given, "key": model_key, "sha256": the digest of its files,
    "files": {file: sha256}}. By design, a folder's files are those at its top level (what transformers reads), but
    hidden ones and documentation (README, LICENSE, *.md, images); a .gguf is its one file; a hub id is its cached
    snapshot where one is cached, else its name alone (sha256 None), as is a GGUF's converted folder (known by its
    GGUF's key)."""
    name, path = str(name), os.path.expanduser(str(name))
    key = model_key(name)
    if os.path.isfile(path):
        files = {os.path.basename(path): sha256(path)}
        return {"model": name, "key": key, "sha256": files[os.path.basename(path)], "files": files}
    if not os.path.exists(path):  # a hub id: its snapshot, if the hub's cache holds one
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(name, local_files_only=True)
        except Exception:  # not cached, or not a hub id: a name
            return {"model": name, "key": key, "sha256": None, "files": None}
    if key.startswith("gguf:"):
        return {"model": name, "key": key, "sha256": None, "files": None}
    names = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)) and not f.startswith(".")
                   and not NOT_MODEL.search(f))
    files = {f: sha256(os.path.join(path, f)) for f in names}
    return {"model": name, "key": key, "sha256": sha256_of(json.dumps(files, sort_keys=True)) if files else None,
            "files": files}


def model_change(then, now):
    """None where two models (model_identity's, or bare names) are the same, else what differs: '<files> changed' for
    the same model whose contents changed, 'another model' otherwise. Known by contents on both sides,
    a copy or a moved folder is the same model; a name alone is compared by its key."""
    then, now = ({"key": model_key(x)} if isinstance(x, str) else x or {} for x in (then, now))
    if then.get("sha256") and now.get("sha256"):
        if then["sha256"] == now["sha256"]:
            return None
        if then.get("key") == now.get("key"):
            a, b = then.get("files") or {}, now.get("files") or {}
            changed = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
            return f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''} changed"
        return "another model"
    return None if then.get("key") == now.get("key") else "another model"


def versions():
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "bitsandbytes", "peft", "datasets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


_CODE = {}


def provenance():
    """The code a run came from: this checkout's git commit and whether its tracked files had uncommitted changes (a
    fork's or an edited copy's results do not pass for the original's); None outside a git checkout."""
    if not _CODE:
        def git(*a):
            return subprocess.run(["git", "-C", cli.HERE, *a], capture_output=True, text=True, timeout=30)
        try:
            head = git("rev-parse", "HEAD")
            dirty = git("status", "--porcelain", "--untracked-files=no")
            ok = head.returncode == 0 and dirty.returncode == 0
            _CODE.update(commit=head.stdout.strip() if ok else None, dirty=bool(dirty.stdout.strip()) if ok else None)
        except (OSError, subprocess.SubprocessError):
            _CODE.update(commit=None, dirty=None)
    return dict(_CODE)


def flat(items):
    """A list with the lists inside it spliced in (flags given more than once)."""
    return [x for item in items for x in (item if isinstance(item, (list, tuple)) else [item])]


def metadata(args, data_files=()):
    """What every output carries beside it: the command (shell-quoted: it re-runs as written), its arguments, the
    model's digest (model_identity; None for a hub id not cached here), the data hashes (files, or lists of them),
    library versions and the code's commit."""
    model = getattr(args, "model", None)
    return {
        "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "args": dict(vars(args)),
        "model_sha256": model_identity(model)["sha256"] if model else None,
        "data": {p: sha256(p) for p in flat(data_files) if p and os.path.isfile(p)},
        "versions": versions(),
        "code": provenance(),
        "processes": int(os.environ.get("WORLD_SIZE", 1)),  # data parallel (torchrun, accelerate launch): procon.py
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextlib.contextmanager
def save_guard(path, partial=None):
    """Writes of `path` whose errors (a full disk, a read-only folder: OSError, safetensors' SafetensorError,
    torch.save's RuntimeError) end in one line naming it; what was half written (`partial`: a temporary) is removed."""
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(OSError):  # (a file system that refuses the removal too: the error is the write's)
            if partial and os.path.lexists(partial):
                shutil.rmtree(partial, ignore_errors=True) if os.path.isdir(partial) else os.remove(partial)
        if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise
        why = (e.strerror if isinstance(e, OSError) else None) or (str(e).strip() or type(e).__name__).splitlines()[0]
        found = re.search(r'message: "([^"]+)"|I/O error: (.+?) \(os error', why)  # safetensors' wording of an OSError
        why = found.group(found.lastindex) if found else why[:160]
        with contextlib.suppress(OSError):  # torch.save words a full disk as its own ("unexpected pos ...")
            if not isinstance(e, OSError) and shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2 ** 20:
                why = "No space left on device"
        cli.fail(f"could not write {path} ({why}); any earlier outputs are kept")


def save_json_text(obj, where, indent=None):
    """obj as strict JSON (no NaN, no Infinity). A number that is NaN or infinite is written as null and named,
    in a warning and in the object's "non_finite" list, rather than the run lost: every script stops at a non-finite
    loss, logit or score itself (check_finite), so one that reaches an output is a number no check foresaw."""
    bad = []

    def clean(x, at):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(at)
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{at}.{k}" if at else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{at}[{i}]") for i, v in enumerate(x)]
        return x
    obj = clean(obj, "")
    if bad:
        print(f"warning: {where}: {len(bad)} NaN or infinite numbers written as null ({', '.join(bad[:4])}"
              f"{', ...' if len(bad) > 4 else ''})", file=sys.stderr)
        obj = {**obj, "non_finite": bad} if isinstance(obj, dict) else obj
    return json.dumps(obj, indent=indent, default=str, allow_nan=False)


def save_text(path, text):
    """Text written atomically (a killed run never leaves half a file); a write error is one line (save_guard)."""
    tmp = path + ".tmp"
    with save_guard(path, tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)


def save_json(path, obj):
    save_text(path, save_json_text(obj, path, indent=2))


def save_torch(path, obj):
    tmp = path + ".tmp"
    with save_guard(path, tmp):
        torch.save(obj, tmp)
        os.replace(tmp, path)


def pyplot():
    """matplotlib's pyplot, drawing to files only (no screen needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    fig.tight_layout()
    with save_guard(path, path):
        fig.savefig(path, dpi=110)
    pyplot().close(fig)


def print_table(header, rows):
    """A run's summary table on stdout: right-aligned columns, as wide as their widest cell."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print()
    for r in cells:
        print(" ".join(c.rjust(w) for c, w in zip(r, widths)))


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
