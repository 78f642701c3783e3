"""artifacts.py: what the scripts save and what they apply to a model (a black box to the method files: an artifact
in, checked whole, applied or merged), each format with one save, one load-and-check, one apply and one merge:

    direction file   direction.pt                                directions.py; evaluate.py --ablate/--steer/--direction
    ACTOR patch      actor_layer.safetensors (+ actor.json)      actor.py; evaluate.py --patch, actor.py --merge
    LoRA adapter     adapter/ (peft's format, + made_on.json)    procon.py; evaluate.py --adapter, procon.py --merge

Every artifact is checked whole against the model it meets before that model's weights are read (from its config, and
its modules built on the meta device): every tensor is read, and one that is not floating point, not finite, or of
another shape than the model's is refused, as is a size or layout that does not fit; so is a recorded model that is
not this one, known by its contents (runrecord.model_identity: a copy is the same model, the same folder with other
weights is not), naming both and what changed, unless the user passes --other-model (a base model's direction on its own
fine-tune is a legitimate study). A file cut short or of another kind is one line, never a traceback; so is an error
while one is written (runrecord.save_guard).
"""
import json
import os
import re
import sys

import torch

import cli
import inference
import loading
import rundir
import runrecord


# ============================================================================ which model
def shape_of(cfg):
    """(architecture, hidden size, number of layers) of a model's config."""
    text = cfg.get_text_config()
    return cfg.model_type, text.hidden_size, text.num_hidden_layers


def record(name, cfg):
    """What an artifact records of the model it was made on: its name, its contents (runrecord.model_identity: the
    digest of its files, and each file's), its shape, and the code."""
    arch, hidden, layers = shape_of(cfg)
    ident = runrecord.model_identity(name)
    return {"model": str(name), "model_key": ident["key"], "model_sha256": ident["sha256"],
            "model_files": ident["files"], "arch": arch, "hidden_size": hidden, "n_layers": layers,
            "code": runrecord.provenance()}


def model_config(name, trust_remote_code=False):
    """A model's config, without reading its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(loading.resolve_model(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        cli.fail(f"could not load model {name!r}: {str(e).strip().splitlines()[0]}")


def skeleton(cfg, trust_remote_code=False):
    """The model's modules on the meta device (no memory, no weights), to check artifacts against; None where an
    architecture cannot be built bare (the checks after loading still hold)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception:
        return None


def check_model(path, made_on, name, cfg, other_model=False):
    """An artifact made on `made_on` (a record, or a bare name) meets model `name` (config cfg): the same shape, and
    the same model by its contents (a copy is the same; the same folder with other weights is not), or --other-model.
    An artifact that records no contents (a hub id, an older file) is compared by the model's name."""
    made_on = made_on if isinstance(made_on, dict) else {"model": made_on}
    arch, hidden, layers = shape_of(cfg)
    then = (made_on.get("arch"), made_on.get("hidden_size"), made_on.get("n_layers"))
    desc = lambda a, h, n: f"{a + ', ' if a else ''}hidden size {h}, {n} layers"  # noqa: E731
    if then[1:] != (None, None) and then[1:] != (hidden, layers):
        cli.fail(f"{path} was made on {made_on.get('model')} ({desc(*then)}), which does not match {name} "
                f"({desc(arch, hidden, layers)})")
    if not made_on.get("model"):
        return
    then_model = {"key": made_on.get("model_key") or runrecord.model_key(made_on["model"]),
                  "sha256": made_on.get("model_sha256"), "files": made_on.get("model_files")}
    change = "another model" if then[0] not in (None, arch) else runrecord.model_change(then_model,
                                                                                        runrecord.model_identity(name))
    if change:
        if not other_model:
            what = f", not on {name}" if change == "another model" else f", and {name} has changed since ({change})"
            what = f" ({then[0]})" + what if then[0] not in (None, arch) else what
            cli.fail(f"{path} was made on {made_on['model']}{what}; pass --other-model to apply it anyway (e.g. to the "
                    "model's own fine-tune)")
        print(f"note: {path} was made on {made_on['model']}, applied to {name} (--other-model)", file=sys.stderr)


def safetensors_shapes(path):
    """({name: shape}, header metadata) of a safetensors file, from its header alone; a cut or foreign file fails."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        cli.fail(f"{path}: damaged or not a safetensors file ({str(e).strip().splitlines()[0][:120]})")


def check_tensor(path, name, t, shape=None):
    """One tensor of an artifact: floating-point numbers, all finite, and (given the model's) of the model's shape."""
    if not t.is_floating_point():
        cli.fail(f"{path}: {name} holds {str(t.dtype).replace('torch.', '')} values, not floating-point numbers")
    if shape is not None and list(t.shape) != list(shape):
        cli.fail(f"{path}: {name} has shape {list(t.shape)}, where the model's is {list(shape)}")
    if not torch.isfinite(t).all():
        cli.fail(f"{path}: {name} holds NaN or infinite values (written by a run that diverged?); it cannot be applied")


def safetensors_tensors(path):
    """(name, tensor) of every tensor of a safetensors file, read one at a time; a damaged file fails in one line."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    except cli.UserError:
        raise
    except Exception as e:
        cli.fail(f"{path}: damaged or not a safetensors file ({str(e).strip().splitlines()[0][:120]})")


# ============================================================================ direction files
def save_direction(path, direction, layer, position, mean_diff, refusal_tokens, made_on, **extra):
    """A unit direction, the layer and position (offset from the prompt's end) it was read at, the raw difference in
    means at every layer (what activation addition adds), the refusal tokens found, and the model."""
    runrecord.save_torch(path, {"direction": direction.contiguous(), "layer": int(layer), "position": int(position),
                         "mean_diff": mean_diff.contiguous(), "refusal_tokens": torch.tensor(refusal_tokens),
                         **made_on, **extra})


def load_direction(path, name=None, cfg=None, other_model=False):
    """A direction file, checked whole: its format, a finite unit direction, every tensor finite, the difference in
    means holding its layer and position, refusal tokens that are token ids; given the model: its size, its layer,
    every row of the difference in means, its tokens in the vocabulary, and its model (by contents)."""
    rundir.settle(os.path.dirname(os.path.abspath(path)))
    cli.check_path(path, "direction file")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        layer, position = int(d["layer"]), int(d.get("position", -1))
    except Exception as e:  # a truncated or foreign file
        cli.fail(f"{path}: not a direction file ({type(e).__name__})")
    if not isinstance(d, dict) or not torch.is_tensor(d.get("direction")):
        cli.fail(f"{path}: not a direction file (no 'direction' and 'layer')")
    r_hat = d["direction"].float()
    if r_hat.dim() != 1 or not torch.isfinite(r_hat).all() or abs(r_hat.norm().item() - 1) > 1e-3:
        cli.fail(f"{path}: its direction is not a finite unit vector")
    for k, v in d.items():
        if torch.is_tensor(v) and k != "refusal_tokens":
            check_tensor(path, k, v)
    md, tokens = d.get("mean_diff"), d.get("refusal_tokens")
    for key in ("mean_diff", "harmless_mean"):  # per layer and position: the difference in means, the harmless mean
        t = d.get(key)
        if t is not None and (t.dim() != 3 or t.shape[2] != len(r_hat) or not 0 <= layer < t.shape[0] or
                              not -t.shape[1] <= position < t.shape[1]):
            cli.fail(f"{path}: its {key} has shape {list(t.shape)}, which holds no layer {layer}, position "
                     f"{position} of a {len(r_hat)}-wide direction")
    if tokens is not None and (not torch.is_tensor(tokens) or tokens.is_floating_point() or tokens.dim() != 1):
        cli.fail(f"{path}: its refusal_tokens are not a list of token ids")
    if cfg is not None:
        n_layers, vocab = d.get("n_layers", shape_of(cfg)[2]), cfg.get_text_config().vocab_size
        check_model(path, {**d, "hidden_size": r_hat.shape[0], "n_layers": n_layers}, name, cfg, other_model)
        if not 0 <= layer < n_layers:
            cli.fail(f"{path}: layer {d['layer']} is outside the model's layers 0..{n_layers - 1}")
        if md is not None and md.shape[0] != n_layers:
            cli.fail(f"{path}: its mean_diff has {md.shape[0]} rows, not one per layer of the model ({n_layers})")
        if tokens is not None and len(tokens) and not (0 <= tokens.min() and tokens.max() < vocab):
            cli.fail(f"{path}: its refusal_tokens {tokens.tolist()} are not all in the model's vocabulary of {vocab}")
    return d


def addition_hooks(model, vector, layer, coeff=1.0):
    """Activation addition (Arditi eq. 3): x <- x + coeff * vector at the input of one layer, at every position."""
    def pre(module, args, kwargs):
        h = inference.hidden_of(args, kwargs)
        return inference.with_hidden(args, kwargs, h + coeff * vector.to(h.device, h.dtype))

    return [(loading.decoder_layers(model)[layer], "pre", pre)]


# ============================================================================ ACTOR patches
PATCH_WEIGHTS, PATCH_META = "actor_layer.safetensors", "actor.json"


def check_patch(folder, name, cfg, other_model=False, skel=None, whole=True):
    """An ACTOR patch against a model: its model (by contents), its layer, its weights' names and shapes against that
    layer's, and (whole) every weight read: floating point and finite. Returns its metadata."""
    cli.check_path(folder, "folder", folder=True)
    rundir.settle(folder)
    weights = os.path.join(folder, PATCH_WEIGHTS)
    if not os.path.isfile(weights):
        cli.fail(f"{folder}: not an ACTOR patch (no {PATCH_WEIGHTS})")
    shapes, header = safetensors_shapes(weights)
    try:
        meta = json.loads(header["actor"]) if "actor" in header else json.load(open(os.path.join(folder, PATCH_META)))
        layer = int(meta["layer"])
    except (OSError, ValueError, KeyError, TypeError):
        cli.fail(f"{folder}: damaged ACTOR patch (no readable layer in its metadata)")
    check_model(folder, {"model": meta.get("base_model"), **meta}, name, cfg, other_model)
    n_layers = shape_of(cfg)[2]
    if not 0 <= layer < n_layers:
        cli.fail(f"{folder}: layer {layer} is outside the layers 0..{n_layers - 1} of {name}")
    own = {k: list(v.shape) for k, v in loading.decoder_layers(skel)[layer].state_dict().items()} if skel else None
    if own is not None and shapes != own:
        cli.fail(f"{folder}: the patch does not fit layer {layer} of {name} (another architecture?)")
    for k, t in safetensors_tensors(weights) if whole else ():
        check_tensor(weights, k, t, own and own[k])
    return meta


def apply_patch(model, folder, name, other_model=False):
    """Swap an ACTOR-trained block into a model (a 4-bit model gets it as a full-precision block)."""
    from safetensors.torch import load_file

    meta = check_patch(folder, name, model.config, other_model, whole=False)
    block = loading.dequantize_block(loading.decoder_layers(model)[int(meta["layer"])])
    weights = load_file(os.path.join(folder, PATCH_WEIGHTS))
    own = block.state_dict()
    if set(weights) != set(own):
        cli.fail(f"{folder}: the patch does not fit layer {meta['layer']} of {name} (another architecture?)")
    for k, t in weights.items():  # read whole here: checked as they are applied
        check_tensor(os.path.join(folder, PATCH_WEIGHTS), k, t, own[k].shape)
    with torch.no_grad():
        for k, v in block.state_dict(keep_vars=True).items():
            v.copy_(weights[k].to(v.device, v.dtype))
    return meta


# ============================================================================ LoRA adapters
def in_out(module):
    """(in features, out features) of a linear layer (nn.Linear, bitsandbytes', or GPT-2's transposed Conv1D)."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def check_adapter(folder, name, cfg, other_model=False, skel=None):
    """A LoRA adapter against a model, from its files alone: adapter_config.json readable, the weights whole, every
    LoRA matrix floating point, finite, of one rank with its twin and fitting the module it adapts, and its base model
    (by contents where made_on.json records them, else by the name peft records). Returns that base model's name."""
    cli.check_path(folder, "folder", folder=True)
    rundir.settle(os.path.dirname(os.path.abspath(folder)))
    conf_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(conf_path):
        cli.fail(f"{folder}: not a LoRA adapter folder (no adapter_config.json)")
    try:
        base = json.load(open(conf_path, encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        cli.fail(f"{conf_path}: damaged (not a JSON object); the adapter was not written whole")
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        cli.fail(f"{folder}: no adapter weights (adapter_model.safetensors); the adapter was not written whole")
    shapes, _ = safetensors_shapes(weights)
    modules = dict(skel.named_modules()) if skel is not None else {}
    for key, t in safetensors_tensors(weights):
        check_tensor(weights, key, t)
    for key, shape in shapes.items():
        m = re.match(r"base_model\.model\.(.+)\.lora_([AB])\.weight$", key)
        twin = m and shapes.get(key[:-len("A.weight")] + ("B" if m.group(2) == "A" else "A") + ".weight")
        if m and not twin:  # peft would leave the missing half at its initial value (B: zero) with a warning
            cli.fail(f"{weights}: {key} has no lora_{'B' if m.group(2) == 'A' else 'A'} twin; the adapter is not whole")
        if twin and (shape[0] if m.group(2) == "A" else twin[0]) != (twin[1] if m.group(2) == "A" else shape[1]):
            cli.fail(f"{weights}: the LoRA weights of {m.group(1)} disagree on their rank ({key}: {shape})")
        if not m or not modules:
            continue
        if m.group(1) not in modules:
            cli.fail(f"{folder} adapts {m.group(1)}, which {name} does not have (an adapter for "
                    f"{base or 'another architecture'})")
        io = in_out(modules[m.group(1)])
        if io and (shape[1] if m.group(2) == "A" else shape[0]) != (io[0] if m.group(2) == "A" else io[1]):
            cli.fail(f"{folder}: its LoRA weights for {m.group(1)} do not fit {name} (shape {shape}; the module maps "
                    f"{io[0]} to {io[1]}): made on {base or 'another model'}")
    try:
        made = json.load(open(os.path.join(folder, ADAPTER_MADE_ON), encoding="utf-8"))
    except (OSError, ValueError):
        made = None
    if base or made:
        check_model(folder, made if isinstance(made, dict) and made.get("model") else base, name, cfg, other_model)
    return base


ADAPTER_MADE_ON = "made_on.json"  # beside peft's files: the record of the model an adapter was trained on


def save_trained(folder, model, tok, made_on=None):
    """procon.py's result and directions.py's ablation as an adapter: a LoRA adapter (peft's files, and made_on.json:
    `made_on`, the record of its base model, which check_adapter reads), or with made_on None (procon.py --full) the
    whole model and its tokenizer. A write error is one
    line, and leaves no half-written folder."""
    with runrecord.save_guard(folder, folder):
        model.save_pretrained(folder)
        if made_on is None:
            tok.save_pretrained(folder)
    if made_on is not None:
        runrecord.save_json(os.path.join(folder, ADAPTER_MADE_ON), made_on)


def apply_adapter(model, folder, name, other_model=False):
    """A LoRA adapter (peft's format) on a model, checked first."""
    from peft import PeftModel

    check_adapter(folder, name, model.config, other_model, model)
    if loading.offloaded(model):
        cli.fail(f"{folder}: a LoRA adapter cannot go on a model whose weights are offloaded (to the CPU or the disk); "
                "merge it first (procon.py --merge) and load the merged model with --device-map")
    try:
        return PeftModel.from_pretrained(model, folder).eval()
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        cli.fail(f"{folder}: could not apply the adapter to {name} ({str(e).strip().splitlines()[0]})")


# ============================================================================ merged models
def made_on(kind, artifact):
    """The base model an ACTOR patch or a LoRA adapter records, read from its files (None where it names none)."""
    rundir.settle(artifact if kind == "patch" else os.path.dirname(os.path.abspath(artifact)))
    if kind == "patch":
        path = os.path.join(artifact, PATCH_WEIGHTS)
        meta = json.loads(safetensors_shapes(path)[1].get("actor", "{}")) if os.path.isfile(path) else {}
        return meta.get("base_model")
    for name, key in ((ADAPTER_MADE_ON, "model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            found = json.load(open(os.path.join(artifact, name), encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            found = None
        if found:
            return found
    return None


def load_unquantised(name, args):
    """The model whose weights an export rewrites, in full precision (4-bit weights cannot be rewritten exactly), on
    --device or spread by --device-map; refused where some weights are offloaded (they are not in memory to rewrite)."""
    model, tok = loading.load_model(name, False, args.chat_template, args.trust_remote_code, args.device,
                               **loading.placement(args))
    check_in_memory(model)
    return model, tok


def check_in_memory(model):
    if loading.offloaded(model):
        cli.fail("an export rewrites every weight, and some of this model's are offloaded (to the CPU or the disk); "
                "give --max-memory room for all of them on the GPUs (or the CPU), or export on a larger machine")


def save_model(folder, model, tok, meta_name=None, meta=None):
    """A model folder that any engine loads (transformers, vLLM, llama.cpp's converter): safetensors weights, config,
    generation config, the tokenizer with its chat template; and a metadata JSON beside them."""
    with runrecord.save_guard(folder):  # a full disk is one line;
                                        # the folder is in the run's work folder, removed with it
        model.save_pretrained(folder)  # safetensors, config.json, generation_config.json
        tok.save_pretrained(folder)
    if meta is not None:
        runrecord.save_json(os.path.join(folder, meta_name), meta)


def save_merged(folder, kind, artifact, base, args, other_model=False):
    """The unquantised base model with a patch ('patch') or an adapter ('adapter') merged in, saved to `folder`."""
    model, tok = load_unquantised(base, args)
    if kind == "patch":
        apply_patch(model, artifact, base, other_model)
    else:
        model = apply_adapter(model, artifact, base, other_model).merge_and_unload()
    save_model(folder, model, tok)
    return model


def merge(kind, artifact, args):
    """--merge: write the unquantised base model with a patch or an adapter merged in to args.out; the base model is
    --model, else the one the artifact records. Checked before the base model's weights are read."""
    base = args.model or made_on(kind, artifact)
    if not base:
        cli.fail(f"{artifact}: not an ACTOR patch or LoRA adapter that names its base model; pass --model")
    cli.check_model_args(args)
    cfg = model_config(base, args.trust_remote_code)
    (check_patch if kind == "patch" else check_adapter)(artifact, base, cfg, args.other_model,
                                                         skeleton(cfg, args.trust_remote_code))
    settings = rundir.settings(args)
    with rundir.run_folder(args.out, None, args.overwrite, settings=settings, known=("config.json",),
                           read=rundir.reads(args, ("the base model", base))) as work:
        model = save_merged(work, kind, artifact, base, args, args.other_model)
    print(f"wrote {base} with {artifact} merged to {args.out}")
    return model


# ============================================================================ ablated models (directions.py)


