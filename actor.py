"""actor.py: ACTOR, cut over-refusal by fine-tuning one layer along the refusal direction, "just enough".

Dabas et al., ICML 2025, "Just Enough Shifts: Mitigating Over-Refusal in Aligned Language Models with Targeted
Representation Fine-Tuning" (arXiv 2507.04250). Each query's activation at the output of one layer l* is moved along
the refusal direction R_hat by an amount proportional to its own projection: away from refusal for benign and
pseudo-harmful queries, towards it for harmful ones. No responses, no generation; only block l* is trained.

    python actor.py --out runs/actor                                   # SmolLM2 and the data/ prompt sets
    python actor.py --model M --pseudo-harmful FILE --layer auto --alpha 1 --epochs 3 --out runs/actor
    python evaluate.py --model M --patch runs/actor --benchmark xstest --data-dir ../shared/benchdata --out runs/eval
    python actor.py --merge runs/actor --out runs/actor-merged        # a full model with the patch applied

The cost of one layer: everything below l* is frozen, so the inputs of block l* never change. They are computed once
(hidden states, attention mask, rotary embeddings: whatever the block receives) and cached, and training, as well as
the renewal of R_hat and the targets each epoch, runs block l* alone. With --load-in-4bit the frozen model stays in
4-bit and block l* is trained as a dequantized copy.
"""
import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import directions
import plumbing as pl

GROUPS = ("harmful", "pseudo_harmful", "benign")  # group ids 0, 1, 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_model_args(p)
    p.set_defaults(model=None)  # filled in below; with --merge the base model comes from the patch
    p.add_argument("--pseudo-harmful", default=os.path.join(pl.DATA, "pseudo_harmful.json"),
                   help="benign queries that look harmful: moved away from refusal")
    p.add_argument("--harmful", default=os.path.join(pl.DATA, "harmful.json"),
                   help="harmful queries: moved towards refusal")
    p.add_argument("--benign", default=os.path.join(pl.DATA, "harmless.json"),
                   help="ordinary benign queries: moved away from refusal (and they anchor R_hat)")
    p.add_argument("--column", default=None, help="prompt column of the query files (default: the first known name)")
    p.add_argument("--limit", type=int, default=None, help="at most N queries per group (a seeded sample)")
    p.add_argument("--layer", default="auto", help="layer l* to train: 'auto' (best silhouette) or an index")
    p.add_argument("--layer-range", default="0.25,0.75",
                   help="auto: search layers in this fraction of depth (the paper finds a middle layer; our choice)")
    p.add_argument("--alpha", type=float, default=1.0, help="size of the shift, in units of the query's projection")
    p.add_argument("--origin", choices=("benign", "zero"), default="benign",
                   help="where projections are measured from: the benign mean (default) or 0 (the formula as "
                   "printed; its sign depends on where the activations sit, see targets())")
    p.add_argument("--epochs", type=int, default=3, help="rounds of training; R_hat and targets are renewed before each")
    p.add_argument("--renew", choices=("epoch", "never"), default="epoch",
                   help="renew R_hat and the targets from the current weights before every epoch (the paper) or keep "
                   "those of the initial weights (targets then cannot compound from epoch to epoch)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate (not given in the paper; 1e-3 measured in bench/bench_actor.py)")
    p.add_argument("--train", choices=("all", "mlp", "attn"), default="all",
                   help="which parameters of block l* are trained (not given in the paper)")
    p.add_argument("--block-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="dtype block l* is trained in (auto: the model's, bf16 for a 4-bit model on GPU)")
    p.add_argument("--batches", choices=("length", "mixed"), default="length",
                   help="training batches (the paper does not say): sorted by length (least padding; most batches then "
                   "hold one query group) or seeded random mixes of the groups (measured: no steadier, README)")
    p.add_argument("--cache-device", choices=("model", "cpu"), default="model",
                   help="keep the cached inputs of block l* on the model's device or in CPU memory")
    p.add_argument("--merge", default=None, metavar="PATCH_DIR",
                   help="instead of training: write the unquantized base model with this patch applied to --out")
    p.add_argument("--out", default="runs/actor", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    return p.parse_args(argv)


# ============================================================================ the cache: the inputs of block l*
class _Stop(Exception):
    """Raised inside the forward pass once block l*'s inputs are recorded: the layers above are never run."""


def _move(x, device, dtype=None):
    """Tensors (also inside tuples, e.g. the rotary (cos, sin)) to a device; floating ones to dtype if given."""
    if torch.is_tensor(x):
        return x.to(device, dtype if dtype is not None and x.is_floating_point() else x.dtype)
    if isinstance(x, (tuple, list)):
        return type(x)(_move(v, device, dtype) for v in x)
    return x


@torch.no_grad()
def cache_block_inputs(model, tok, prompts, layer, batch_size, device=None, mix_seed=None):
    """Run layers 0..l*-1 once per batch and keep everything block l* receives.

    A forward pre-hook on block l* records its positional and keyword arguments as the model passes them (hidden
    states [B, T, d], the attention mask as this attention implementation wants it, rotary (cos, sin), position ids)
    and stops the forward pass. Batches are fixed, left padded, so the last token is position -1: sorted by length
    (least padding), or, with mix_seed, a seeded shuffle of all queries (each batch then mixes the query groups).
    Returns a list of (prompt indices, args, kwargs).
    """
    block = pl.decoder_layers(model)[layer]
    texts = pl.format_chat(tok, prompts)
    if mix_seed is None:
        batches = pl.length_batches(tok, texts, batch_size)
    else:
        order = list(range(len(texts)))
        random.Random(mix_seed).shuffle(order)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    device = device or pl.model_device(model)
    cache, idx = [], None

    def grab(module, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        cache.append((idx, _move(tuple(args), device), {k: _move(v, device) for k, v in kwargs.items()}))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for idx in tqdm(batches, desc=f"caching inputs of layer {layer}", leave=False):
            enc = pl.tokenize(tok, [texts[i] for i in idx], pl.model_device(model))
            try:
                model(**enc, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return cache


def block_forward(block, entry):
    """Block l* alone on one cached batch; returns a, its output at the last token, [batch, d] in fp32."""
    _, args, kwargs = entry
    p = next(block.parameters())
    kwargs = {k: _move(v, p.device, None if k == "attention_mask" else p.dtype) for k, v in kwargs.items()}
    mask = kwargs.get("attention_mask")
    if torch.is_tensor(mask) and mask.is_floating_point() and mask.dtype != p.dtype:  # an additive mask
        kwargs["attention_mask"] = mask.clamp(min=torch.finfo(p.dtype).min).to(p.dtype)
    out = block(*_move(args, p.device, p.dtype), use_cache=False, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return out[:, -1].float()


def activations(block, cache, n):
    """a for every query, in prompt order: [n, d] (fp32, on the block's device)."""
    a = None
    with torch.no_grad():
        for entry in cache:
            out = block_forward(block, entry)
            if a is None:
                a = torch.zeros(n, out.shape[1], device=out.device)
            a[entry[0]] = out
    return a


# ============================================================================ the method
def refusal_direction(a, groups):
    """R = mean(a | harmful) - mean(a | benign); R_hat = R / |R| (the paper: harmful vs harmless).

    Our choice: the harmless side is the benign group only. Pseudo-harmful queries are the ones to be moved, so letting
    them define the direction they are moved along would be circular.
    """
    R = a[groups == 0].mean(0) - a[groups == 2].mean(0)
    return R / R.norm().clamp(min=1e-8)


def targets(a, r_hat, groups, alpha, origin="benign"):
    """ACTOR's per-query target (the shift is proportional to the query's own projection p: just enough):
        benign, pseudo-harmful:  a_tgt = a - alpha * p * R_hat
        harmful:                 a_tgt = a + alpha * p * R_hat

    The paper writes p = a . R_hat. Measured from 0, its sign depends on where the activations happen to sit: on the
    over-refusing SmolLM2 all three groups project negatively at middle layers, and the printed formula would then push
    benign queries towards refusal and harmful ones away. Our choice (--origin benign, the default): p is measured
    from the benign mean, p = (a - mean(a | benign)) . R_hat, and only its refusal side counts, max(p, 0). Pseudo-harmful
    queries then move to the benign level (alpha = 1), harmful ones move further out, and queries that already sit
    below the benign mean keep their activation as target (they anchor the block). --origin zero is the formula as
    printed.
    """
    if origin == "benign":
        p = ((a - a[groups == 2].mean(0)) @ r_hat).clamp(min=0)
    else:
        p = a @ r_hat
    sign = torch.where(groups.to(a.device) == 0, 1.0, -1.0)
    return a + (sign * alpha * p).unsqueeze(-1) * r_hat


def loss_fn(a, a_tgt):
    """L = 1 - cos(a(theta), a_tgt), averaged over queries."""
    return (1 - F.cosine_similarity(a, a_tgt, dim=-1)).mean()


def trainable(block, which):
    """The parameters of block l* that ACTOR trains (the paper does not say which: --train, all by default)."""
    block.requires_grad_(False)
    for name, p in block.named_parameters():
        if which == "all" or (which == "mlp" and "mlp" in name) or (which == "attn" and "attn" in name):
            p.requires_grad_(True)
    params = [p for p in block.parameters() if p.requires_grad]
    if not params:
        pl.fail(f"--train {which}: block l* has no such parameters")
    return params


def train_epoch(block, cache, a_tgt, opt, order):
    """One pass over the cached batches in the given order, block l* forward and backward; returns the mean loss."""
    total, n = 0.0, 0
    for b in order:
        idx = cache[b][0]
        a = block_forward(block, cache[b])
        loss = loss_fn(a, a_tgt[idx].to(a.device))
        if not torch.isfinite(loss):
            pl.fail(f"the loss became {loss.item()}; try a lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, n = total + loss.item() * len(idx), n + len(idx)
    return total / n


def projections(a, r_hat, groups):
    """Mean projection of each query group onto R_hat."""
    return {name: (a[groups == g] @ r_hat).mean().item() for g, name in enumerate(GROUPS)}


def actor(block, cache, groups, alpha, origin, lr, epochs, train="all", seed=0, log=print, renew="epoch"):
    """The loop: before each epoch R_hat and the targets are renewed from the current weights of block l* (with
    renew="never" they stay those of the initial weights); then one pass of AdamW over the cached batches (fixed
    batches, their order shuffled with the seed). Returns the epoch log and the activations before and after training."""
    n = len(groups)
    opt = torch.optim.AdamW(trainable(block, train), lr=lr, weight_decay=0.0)
    a_init = activations(block, cache, n)
    a, history = a_init, []
    for epoch in range(epochs):
        src = a if renew == "epoch" else a_init  # the activations R_hat and the targets are computed from
        r_hat = refusal_direction(src, groups)
        a_tgt = targets(src, r_hat, groups, alpha, origin)
        order = list(range(len(cache)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        loss = train_epoch(block, cache, a_tgt, opt, order)
        history.append({"epoch": epoch + 1, "loss": loss, "mean_projection": projections(a, r_hat, groups)})
        log(f"epoch {epoch + 1}/{epochs}: loss {loss:.5f}  mean projection onto R_hat (start of epoch): " +
            "  ".join(f"{k} {v:+.2f}" for k, v in history[-1]["mean_projection"].items()))
        a = activations(block, cache, n)
    block.requires_grad_(False)
    return history, a_init, a


# ============================================================================ layer choice
def choose_layer(model, tok, prompts, groups, layer_range, batch_size):
    """ACTOR's l*: the layer whose last-token outputs best separate harmful from benign queries (silhouette score),
    searched within a band of depth (our choice; the paper reports a middle layer). Returns (layer, scores)."""
    n_layers = pl.text_config(model).num_hidden_layers
    lo, hi = layer_range
    band = [l for l in range(n_layers) if lo * n_layers <= l < hi * n_layers] or list(range(n_layers))
    keep = groups != 1
    acts = pl.capture(model, tok, [p for p, k in zip(prompts, keep.tolist()) if k], 1, batch_size, "choosing layer")
    labels = (groups[keep] == 0).long()
    scores = {l: directions.silhouette(acts[:, l + 1, -1], labels) for l in band}  # index l + 1: the output of layer l
    return max(scores, key=scores.get), scores


# ============================================================================ patches
def load_patch(patch_dir):
    """Read an ACTOR patch: (actor.json as a dict, the trained block's state_dict)."""
    from safetensors.torch import load_file

    meta_path, weights_path = os.path.join(patch_dir, "actor.json"), os.path.join(patch_dir, "actor_layer.safetensors")
    if not (os.path.isfile(meta_path) and os.path.isfile(weights_path)):
        pl.fail(f"{patch_dir}: not an ACTOR patch (needs actor.json and actor_layer.safetensors)")
    try:
        meta = json.load(open(meta_path))
        weights = load_file(weights_path)
    except Exception as e:  # truncated or foreign files
        pl.fail(f"{patch_dir}: unreadable ACTOR patch ({type(e).__name__})")
    if not all(k in meta for k in ("layer", "hidden_size", "n_layers")):
        pl.fail(f"{patch_dir}/actor.json: needs 'layer', 'hidden_size' and 'n_layers'")
    return meta, weights


def apply_patch(model, patch_dir):
    """Swap an ACTOR-trained block into a model (a 4-bit model gets it as a full-precision block). Sizes that do not
    match fail; a different base model name only warns, since one model has many names (hub id, local path)."""
    meta, weights = load_patch(patch_dir)
    cfg = pl.text_config(model)
    if meta["hidden_size"] != cfg.hidden_size or meta["n_layers"] != cfg.num_hidden_layers:
        pl.fail(f"{patch_dir} was trained on {meta.get('base_model')} (hidden size {meta['hidden_size']}, "
               f"{meta['n_layers']} layers), which does not match this model (hidden size {cfg.hidden_size}, "
               f"{cfg.num_hidden_layers} layers)")
    name = getattr(model.config, "_name_or_path", "") or ""
    if meta.get("base_model") and os.path.basename(str(meta["base_model"]).rstrip("/")) != os.path.basename(
            name.rstrip("/")):
        print(f"warning: {patch_dir} was trained on {meta['base_model']}, applied to {name}", file=sys.stderr)
    if not 0 <= int(meta["layer"]) < cfg.num_hidden_layers:
        pl.fail(f"{patch_dir}: layer {meta['layer']} is outside this model's layers 0..{cfg.num_hidden_layers - 1}")
    block = pl.dequantize_block(pl.decoder_layers(model)[int(meta["layer"])])
    own = block.state_dict()
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        pl.fail(f"{patch_dir}: the patch does not fit layer {meta['layer']} of this model")
    with torch.no_grad():
        for k, v in block.state_dict(keep_vars=True).items():
            v.copy_(weights[k].to(v.device, v.dtype))
    return meta


def merge(args):
    """Write the unquantized base model with the patch applied, as a full model directory."""
    meta, _ = load_patch(args.merge)
    pl.prepare_out(args.out, ("config.json", "model.safetensors"), args.overwrite)
    base = args.model or meta.get("base_model")
    model, tok = pl.load_model(base, False, args.chat_template, args.trust_remote_code, args.device)
    apply_patch(model, args.merge)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote {base} with the ACTOR patch of {args.merge} (layer {meta['layer']}) to {args.out}")


# ============================================================================ main
def n_layers_of(model_name, trust_remote_code):
    """The model's number of decoder layers from its config alone (to check --layer before loading weights)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(pl.resolve_model(model_name), trust_remote_code=trust_remote_code)
        return cfg.get_text_config().num_hidden_layers
    except (OSError, ValueError, KeyError):
        return None  # load_model will say what is wrong


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    args.model = args.model or pl.default_model()
    outputs = ("actor_layer.safetensors", "actor.json", "projections.png")
    pl.prepare_out(args.out, outputs, args.overwrite)
    pl.seed_everything(args.seed)
    t0 = time.time()

    # ---- arguments and data, checked before any work: three query groups (0 harmful, 1 pseudo-harmful, 2 benign)
    if args.layer != "auto" and not args.layer.lstrip("-").isdigit():
        pl.fail(f"--layer {args.layer!r}: expected 'auto' or a layer index")
    try:
        layer_range = tuple(float(x) for x in args.layer_range.split(","))
        assert len(layer_range) == 2 and 0 <= layer_range[0] < layer_range[1] <= 1
    except (ValueError, AssertionError):
        pl.fail(f"--layer-range {args.layer_range!r}: expected two fractions of depth, like 0.25,0.75")
    if args.epochs < 1 or args.lr <= 0 or args.alpha < 0:
        pl.fail("--epochs must be at least 1, --lr positive and --alpha not negative")
    files = {"harmful": args.harmful, "pseudo_harmful": args.pseudo_harmful, "benign": args.benign}
    prompts, groups = [], []
    for g, name in enumerate(GROUPS):
        qs = pl.read_prompts(files[name], args.column, args.limit, args.seed)
        prompts += qs
        groups += [g] * len(qs)
    groups = torch.tensor(groups)
    n_layers = n_layers_of(args.model, args.trust_remote_code)
    if args.layer != "auto" and n_layers is not None and not 0 <= int(args.layer) < n_layers:
        pl.fail(f"--layer {args.layer} is out of range: this model has layers 0..{n_layers - 1}")

    # ---- model (frozen everywhere)
    model, tok = pl.load_model(args.model, args.load_in_4bit, args.chat_template, args.trust_remote_code, args.device)
    n_layers = pl.text_config(model).num_hidden_layers

    # ---- target layer l*: best silhouette of harmful vs benign last-token outputs, or fixed
    sil = {}
    if args.layer == "auto":
        layer, sil = choose_layer(model, tok, prompts, groups, layer_range, args.batch_size)
    else:
        layer = int(args.layer)
        if not 0 <= layer < n_layers:
            pl.fail(f"--layer {layer} is out of range: this model has layers 0..{n_layers - 1}")

    # ---- the cache: the inputs of block l*, computed once (layers above l* are not run)
    cache = cache_block_inputs(model, tok, prompts, layer, args.batch_size,
                               "cpu" if args.cache_device == "cpu" else None,
                               args.seed if args.batches == "mixed" else None)
    cache_mb = sum(t.numel() * t.element_size() for _, a, kw in cache for t in _tensors((a, kw))) / 2 ** 20

    # ---- block l* as a trainable copy: dequantized from 4-bit if needed, in the chosen dtype
    block = pl.decoder_layers(model)[layer]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.block_dtype)
    block = pl.dequantize_block(block, dtype)
    if dtype is not None:
        block.to(dtype)

    # ---- ACTOR: R_hat and targets renewed each epoch, block l* trained on the cached inputs
    print(f"ACTOR on layer {layer} of {n_layers} ({'silhouette' if sil else 'fixed'}): "
          f"{', '.join(f'{int((groups == g).sum())} {n}' for g, n in enumerate(GROUPS))} queries, "
          f"cache {cache_mb:.1f} MiB on {args.cache_device}")
    t_train = time.time()
    history, a_init, a_final = actor(block, cache, groups, args.alpha, args.origin, args.lr, args.epochs,
                                     args.train, args.seed, renew=args.renew)
    t_train = time.time() - t_train
    r_hat_init, r_hat_final = refusal_direction(a_init, groups), refusal_direction(a_final, groups)

    # ---- outputs: the trained block only, its metadata, the picture of what ACTOR did
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()},
              os.path.join(args.out, "actor_layer.safetensors.tmp"))
    os.replace(os.path.join(args.out, "actor_layer.safetensors.tmp"), os.path.join(args.out, "actor_layer.safetensors"))
    before, after = projections(a_init, r_hat_init, groups), projections(a_final, r_hat_init, groups)
    pl.save_json(os.path.join(args.out, "actor.json"), {
        "base_model": args.model, "layer": layer, "layer_choice": "silhouette" if sil else "fixed",
        "n_layers": n_layers, "hidden_size": pl.text_config(model).hidden_size, "alpha": args.alpha,
        "origin": args.origin, "lr": args.lr, "epochs": args.epochs, "renew": args.renew, "train": args.train,
        "batches": args.batches, "batch_size": args.batch_size,
        "block_dtype": str(next(block.parameters()).dtype), "load_in_4bit": args.load_in_4bit, "seed": args.seed,
        "n_queries": {name: int((groups == g).sum()) for g, name in enumerate(GROUPS)},
        "data_sha256": {name: pl.sha256(f) for name, f in files.items()},
        "silhouette": sil, "epochs_log": history,
        "projection_on_initial_r_hat": {"before": before, "after": after},
        "cos_initial_final_r_hat": float(r_hat_init @ r_hat_final),
        "cache_mib": round(cache_mb, 2), "train_seconds": round(t_train, 2), "seconds": round(time.time() - t0, 1),
        **pl.metadata(args, list(files.values()))})
    plot_projections(os.path.join(args.out, "projections.png"), (a_init @ r_hat_init).cpu(),
                     (a_final @ r_hat_init).cpu(), groups, layer, args.model)

    print(f"\nACTOR on layer {layer}, alpha {args.alpha}, lr {args.lr}, {args.epochs} epochs in {t_train:.1f}s")
    print(f"{'group':>15} {'n':>4} {'proj before':>12} {'proj after':>11}   (onto the initial R_hat)")
    for g, name in enumerate(GROUPS):
        print(f"{name:>15} {int((groups == g).sum()):>4} {before[name]:>12.2f} {after[name]:>11.2f}")
    print(f"\nwrote {', '.join(os.path.join(args.out, o) for o in outputs)} in {time.time() - t0:.0f}s")
    return model  # with block l* trained in place (for tests and notebooks)


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def plot_projections(path, before, after, groups, layer, model_name):
    """Histograms of each group's projection onto the initial R_hat, before and after ACTOR."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    lo, hi = min(before.min(), after.min()).item(), max(before.max(), after.max()).item()
    bins = torch.linspace(lo, hi, 40).tolist()
    for ax, proj, title in ((axes[0], before, "before"), (axes[1], after, "after ACTOR")):
        for g, (name, color) in enumerate(zip(GROUPS, ("tab:red", "tab:orange", "tab:blue"))):
            ax.hist(proj[groups == g].tolist(), bins=bins, alpha=0.5, color=color, label=name.replace("_", "-"))
            ax.axvline(proj[groups == g].mean().item(), color=color, lw=1.5)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("queries")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel(f"projection onto R_hat (layer {layer} output, last token; R_hat before training)")
    fig.suptitle(f"ACTOR: {os.path.basename(str(model_name).rstrip('/'))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    pl.run_main(main)
