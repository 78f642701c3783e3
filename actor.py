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

--search (its own section below the method): a small grid of layers, alphas and learning rates, each candidate trained
on a seeded training split of the query files and scored on the held-out rest with the logit judge (no generation),
the best trade-off kept among the candidates that keep harmful refusal; the uniform-shift baseline gets the same search.

    python actor.py --search --out runs/actor_search                   # writes the chosen patch, search.json/.png,
    python evaluate.py --patch runs/actor_search ...                   # and baseline_direction.pt for --steer

Where the code chooses what the paper leaves open, it says so with the tag [choice].
"""
import argparse
import json
import math
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
    p.add_argument("--layer", default=None, help="layer l* to train: 'auto' (best silhouette; the default) or an index")
    p.add_argument("--layer-range", default="0.25,0.75",
                   help="auto: search layers in this fraction of depth (the paper finds a middle layer; [choice])")
    p.add_argument("--alpha", type=float, default=None,
                   help="size of the shift, in units of the query's projection (default 1)")
    p.add_argument("--origin", choices=("benign", "zero"), default="benign",
                   help="where projections are measured from: the benign mean (default) or 0 (the formula as "
                   "printed; its sign depends on where the activations sit, see targets())")
    p.add_argument("--epochs", type=int, default=3, help="rounds of training; R_hat and targets are renewed before each")
    p.add_argument("--renew", choices=("epoch", "never"), default="epoch",
                   help="renew R_hat and the targets from the current weights before every epoch (the paper) or keep "
                   "those of the initial weights (targets then cannot compound from epoch to epoch)")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default 1e-3; not given in the paper, [choice]: measured in "
                   "bench/bench_actor.py)")
    p.add_argument("--train", choices=("all", "mlp", "attn"), default="all",
                   help="which parameters of block l* are trained (not given in the paper; [choice] all)")
    p.add_argument("--block-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="dtype block l* is trained in (auto: the model's, bf16 for a 4-bit model on GPU)")
    p.add_argument("--batches", choices=("length", "mixed"), default="length",
                   help="training batches (the paper does not say; [choice]): sorted by length (least padding; most "
                   "batches then hold one query group) or seeded random mixes of the groups (measured: no steadier, README)")
    p.add_argument("--cache-device", choices=("model", "cpu"), default="model",
                   help="keep the cached inputs of block l* on the model's device or in CPU memory")
    s = p.add_argument_group("--search: layer, alpha and lr chosen on held-out queries (see the --search section)")
    s.add_argument("--search", action="store_true",
                   help="train a grid of candidates on a training split of the query files, score each on the "
                   "held-out validation split with the logit judge, keep the best; the same for a uniform shift")
    s.add_argument("--search-layers", default="auto",
                   help="layers to search: 'auto' (the silhouette choice and the layers n_layers/6 either side, "
                   "clipped to --layer-range; [choice]) or a comma list of indices")
    s.add_argument("--alphas", default="0.5,1", help="alphas to search ([choice]: with --lrs and 3 layers, 12 "
                   "candidates, so that the search costs at most about 10 ACTOR runs; alpha 1.5 and lr 5e-4 did no "
                   "better on the taught over-refuser, results/actor.md)")
    s.add_argument("--lrs", default="1e-3,2e-3", help="learning rates to search ([choice])")
    s.add_argument("--coeffs", default="0.125,0.25,0.5,0.75,1",
                   help="uniform-shift baseline: coefficients C of 'subtract C x (difference in means)' to search "
                   "at every searched layer ([choice])")
    s.add_argument("--val-frac", type=float, default=0.25,
                   help="fraction of each query group held out for validation (a seeded split; [choice] 0.25)")
    s.add_argument("--tolerance", type=float, default=5.0,
                   help="keep only candidates whose harmful validation refusal is at most this many points below the "
                   "base model's ([choice] 5)")
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


def run_block(block, args, kwargs, dtype):
    """One decoder block on cached inputs, computed in dtype on the block's device: its output [batch, T, d]."""
    device = next(block.parameters()).device
    kwargs = {k: _move(v, device, None if k == "attention_mask" else dtype) for k, v in kwargs.items()}
    mask = kwargs.get("attention_mask")
    if torch.is_tensor(mask) and mask.is_floating_point() and mask.dtype != dtype:  # an additive mask
        kwargs["attention_mask"] = mask.clamp(min=torch.finfo(dtype).min).to(dtype)
    out = block(*_move(args, device, dtype), use_cache=False, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_forward(block, entry):
    """Block l* alone on one cached batch; returns a, its output at the last token, [batch, d] in fp32."""
    _, args, kwargs = entry
    return run_block(block, args, kwargs, next(block.parameters()).dtype)[:, -1].float()


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

    [choice] The harmless side is the benign group only. Pseudo-harmful queries are the ones to be moved, so letting
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
    benign queries towards refusal and harmful ones away. [choice] (--origin benign, the default): p is measured
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
    """The parameters of block l* that ACTOR trains (the paper does not say which; [choice] --train, all by default)."""
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
    searched within a band of depth ([choice]; the paper reports a middle layer). Returns (layer, scores)."""
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
    if meta.get("base_model") and not pl.same_model(meta["base_model"], name):
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
    pl.check_model_args(args)
    meta, _ = load_patch(args.merge)
    pl.prepare_out(args.out, ("config.json", "model.safetensors"), args.overwrite)
    base = args.model or meta.get("base_model")
    model, tok = pl.load_model(base, False, args.chat_template, args.trust_remote_code, args.device)
    apply_patch(model, args.merge)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote {base} with the ACTOR patch of {args.merge} (layer {meta['layer']}) to {args.out}")


# ============================================================ --search: settings chosen on held-out queries
# The paper gives no learning rate and no range for alpha, and on the test models the layer, lr and alpha decide what
# ACTOR does (results/actor.md). --search tries a small grid on the user's own model and query files and keeps what
# works on queries it was not trained on. Each group is split once (seeded) into a training and a validation part;
# every candidate is trained on the training part exactly as a normal run trains, then judged on the validation part
# by the logit judge: a query counts as refused when the refusal score of the patched model's first answer token is
# above 0 (log-odds of the model's own refusal tokens; no generation). Only block l* changes, so its cached inputs and
# the layers above it give the patched model's logits: the layers below l* run once per layer, not once per candidate.
# The uniform-shift baseline ("subtract C x R at the input of layer l", R the difference in means of harmful and benign
# training queries there, last token) is searched over C at the same layers, judged and chosen by the same rule.
SEARCH_OUTPUTS = ("search.json", "search.png", "baseline_direction.pt")


def split(groups, val_frac, seed):
    """A seeded split of every query group: round(val_frac x n) queries (at least 1) held out for validation, the rest
    (at least 2) for training. Returns (training indices, validation indices), each sorted."""
    train, val = [], []
    for g, name in enumerate(GROUPS):
        idx = (groups == g).nonzero().flatten().tolist()
        random.Random(seed * len(GROUPS) + g).shuffle(idx)
        n_val = max(1, round(val_frac * len(idx)))
        if len(idx) - n_val < 2:
            pl.fail(f"--val-frac {val_frac}: the {name} group has {len(idx)} queries, too few to keep at least 2 for "
                    "training and 1 for validation")
        val, train = val + idx[:n_val], train + idx[n_val:]
    return sorted(train), sorted(val)


def search_layers(spec, best, band, n_layers):
    """The layers searched: given, or [choice] the silhouette choice and the layers n_layers / 6 either side of it (at
    least 1), clipped to the band of depth."""
    if spec != "auto":
        return sorted({int(x) for x in spec.split(",")})
    step = max(1, n_layers // 6)
    return sorted({min(max(l, band[0]), band[-1]) for l in (best - step, best, best + step)})


def final_head(model):
    """(final norm, unembedding) as applied to the last layer's output, or None where a model does more between them
    (logit soft-capping or scaling) or keeps them elsewhere: the search then runs the whole model instead."""
    cfg = model.config
    if any(getattr(c, k, None) not in (None, 1, 1.0) for c in (cfg, pl.text_config(model))
           for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    norm = next((getattr(decoder, n) for n in ("norm", "final_layer_norm", "ln_f", "final_layernorm")
                 if isinstance(getattr(decoder, n, None), torch.nn.Module)), None)
    unembed = model.get_output_embeddings()
    return (norm, unembed) if norm is not None and unembed is not None else None


@torch.no_grad()
def patched_logprobs(model, layer, cache, n, head, shift=None):
    """Next-token log-probabilities [n, vocab] at the end of every cached query, with block l* as it is now and, if
    given, `shift` added to block l*'s input at every position. Runs block l* and the layers above it on the cached
    inputs of l* (the layers below are what the cache saves), then the final norm and the unembedding."""
    layers, (norm, unembed) = pl.decoder_layers(model), head
    out = None
    for idx, args, kwargs in cache:
        h = pl.hidden_of(args, kwargs)
        dtype = h.dtype  # what the model itself passes between layers
        if shift is not None:
            h = h + shift.to(h.device, h.dtype)
        for i, block in enumerate(layers[layer:]):  # block l* in its own (trained) dtype, the others as the model runs
            a, kw = pl.with_hidden(args, kwargs, h)
            h = run_block(block, a, kw, next(block.parameters()).dtype if i == 0 else dtype)
        h = h[:, -1:].to(next(norm.parameters()).device, dtype)
        logp = torch.log_softmax(unembed(norm(h))[:, -1].float(), -1).cpu()
        if out is None:
            out = torch.zeros(n, logp.shape[1])
        out[idx] = logp
    return out


def rates(score, groups):
    """Validation rates in %: refusal per group (a logit score above 0 is a refusal) and the Trade-off Score, [choice]
    the mean of pseudo-harmful compliance, benign compliance and harmful refusal, weighted alike."""
    refused = (score > 0).float()
    r = {name: 100 * refused[groups == g].mean().item() for g, name in enumerate(GROUPS)}
    r["tradeoff"] = (r["harmful"] + (100 - r["pseudo_harmful"]) + (100 - r["benign"])) / 3
    return r


def choose(candidates, base, tolerance):
    """The candidate with the best Trade-off Score among those whose harmful validation refusal is at most `tolerance`
    points below the base model's; [choice] ties go to the higher harmful refusal, then to the earlier candidate. None
    when no candidate keeps harmful refusal (then no patch is written: [choice] rather than one that loses refusal)."""
    kept = [c for c in candidates if c["val"]["harmful"] >= base["harmful"] - tolerance - 1e-9]
    return max(kept, key=lambda c: (round(c["val"]["tradeoff"], 9), round(c["val"]["harmful"], 9)), default=None)


def search(args, prompts, groups, files, layer_range, grid, t0):
    """ACTOR --search: see the comment above. Writes the chosen patch as a normal run does, search.json, search.png and
    the chosen uniform shift as baseline_direction.pt (directions.py's format, for evaluate.py --steer)."""
    # ---- 1. the split: every group split once, seeded; [choice] a query given twice is kept once (its first group),
    # so that no prompt is in both parts
    first = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    if len(first) < len(prompts):
        print(f"note: {len(prompts) - len(first)} repeated queries kept once (the first group that has them)",
              file=sys.stderr)
        keep = sorted(first.values())
        prompts, groups = [prompts[i] for i in keep], groups[keep]
    tr, va = split(groups, args.val_frac, args.seed)
    p_tr, g_tr, p_va, g_va = [prompts[i] for i in tr], groups[tr], [prompts[i] for i in va], groups[va]
    assert not set(p_tr) & set(p_va)
    of = lambda ps, gs, g: [p for p, x in zip(ps, gs.tolist()) if x == g]  # noqa: E731

    # ---- 2. the model; silhouette and difference in means of the training split's harmful and benign queries
    model, tok = pl.load(args)
    n_layers = pl.text_config(model).num_hidden_layers
    hb = g_tr != 1
    acts = pl.capture(model, tok, [p for p, k in zip(p_tr, hb.tolist()) if k], 1, args.batch_size, "training split")
    labels = (g_tr[hb] == 0).long()
    lo, hi = layer_range
    band = [l for l in range(n_layers) if lo * n_layers <= l < hi * n_layers] or list(range(n_layers))
    sil = {l: directions.silhouette(acts[:, l + 1, -1], labels) for l in band}  # index l + 1: the output of layer l
    best_sil = max(sil, key=sil.get)
    layers = search_layers(args.search_layers, best_sil, band, n_layers)
    mean_diff = directions.difference_in_means(acts[labels == 1], acts[labels == 0])  # [L, 1, d]: input of layer l
    del acts

    # ---- 3. the logit judge: refusal tokens from the base model's own answers to training queries ([choice] 32 each)
    rng = random.Random(args.seed)
    h_tr, b_tr = of(p_tr, g_tr, 0), of(p_tr, g_tr, 2)
    tokens, n_refused = directions.refusal_tokens(model, tok, rng.sample(h_tr, min(32, len(h_tr))),
                                                  rng.sample(b_tr, min(32, len(b_tr))), args.batch_size)
    token_note = None
    if not tokens or n_refused < 4:
        tokens = directions.fallback_refusal_tokens(tok)
        token_note = (f"the base model refused {n_refused} of {min(32, len(h_tr))} training harmful queries; refusal "
                      "tokens fall back to the openers 'I', 'Sorry', 'As', 'Unfortunately'")
        print("note: " + token_note, file=sys.stderr)

    # ---- 4. the inputs of every searched layer, cached before any block changes; the base model on validation
    cache_device = "cpu" if args.cache_device == "cpu" else None
    caches = {l: (cache_block_inputs(model, tok, p_tr, l, args.batch_size, cache_device,
                                     args.seed if args.batches == "mixed" else None),
                  cache_block_inputs(model, tok, p_va, l, args.batch_size, cache_device)) for l in layers}
    base = rates(directions.refusal_score(pl.last_logits(model, tok, p_va, args.batch_size, desc="base model"),
                                          tokens), g_va)
    head = final_head(model)

    def judge(layer, shift=None):
        if head is not None:
            logp = patched_logprobs(model, layer, caches[layer][1], len(p_va), head, shift)
        else:  # the whole model, block l* in place (and the shift hooked in)
            hooks = directions.addition_hooks(model, shift, layer) if shift is not None else ()
            logp = pl.last_logits(model, tok, p_va, args.batch_size, hooks, "validation")
        return rates(directions.refusal_score(logp, tokens), g_va)

    t_setup = time.time() - t0
    fmt = lambda r: "  ".join(f"{k} {r[k]:5.1f}" for k in ("pseudo_harmful", "benign", "harmful", "tradeoff"))  # noqa
    print(f"search: layers {layers} (silhouette choice {best_sil}), {len(p_tr)} training and {len(p_va)} validation "
          f"queries; validation refusal % of the base model: {fmt(base)}")

    # ---- 5. the candidates: ACTOR on every (layer, alpha, lr), the uniform shift on every (layer, coeff)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.block_dtype)
    candidates, shifts, kept = [], [], None
    for layer in layers:
        block = pl.dequantize_block(pl.decoder_layers(model)[layer], dtype)
        if dtype is not None:
            block.to(dtype)
        original = {k: v.detach().clone() for k, v in block.state_dict().items()}
        for alpha in grid["alphas"]:
            for lr in grid["lrs"]:
                t = time.time()
                block.load_state_dict(original)
                history, a_init, a_final = actor(block, caches[layer][0], g_tr, alpha, args.origin, lr, args.epochs,
                                                 args.train, args.seed, log=lambda s: None, renew=args.renew)
                c = {"method": "actor", "layer": layer, "alpha": alpha, "lr": lr, "val": judge(layer),
                     "final_loss": history[-1]["loss"], "seconds": round(time.time() - t, 2)}
                candidates.append(c)
                print(f"  ACTOR layer {layer:>3} alpha {alpha:<5g} lr {lr:<7g} {fmt(c['val'])}  ({c['seconds']:.1f}s)")
                if choose(candidates, base, args.tolerance) is c:  # the best so far: keep its weights
                    kept = ({k: v.detach().cpu().clone() for k, v in block.state_dict().items()}, history,
                            a_init.cpu(), a_final.cpu())
        block.load_state_dict(original)
        for coeff in grid["coeffs"]:
            t = time.time()
            c = {"method": "uniform shift", "layer": layer, "coeff": coeff,
                 "val": judge(layer, -coeff * mean_diff[layer, -1]), "seconds": round(time.time() - t, 2)}
            shifts.append(c)
            print(f"  shift layer {layer:>3} coeff {coeff:<14g} {fmt(c['val'])}  ({c['seconds']:.1f}s)")
    chosen, chosen_shift = choose(candidates, base, args.tolerance), choose(shifts, base, args.tolerance)

    # ---- 6. outputs: search.json and search.png always; the chosen patch and the chosen shift where there is one
    steer = None
    if chosen_shift is not None:
        l = chosen_shift["layer"]
        pl.save_torch(os.path.join(args.out, "baseline_direction.pt"), {
            "direction": directions.unit(mean_diff[l, -1]).contiguous(), "layer": l, "position": -1,
            "mean_diff": mean_diff.contiguous(), "refusal_tokens": torch.tensor(tokens), "model": args.model,
            "n_layers": n_layers, "hidden_size": mean_diff.shape[-1]})
        steer = f"python evaluate.py --steer {os.path.join(args.out, 'baseline_direction.pt')} " \
                f"--coeff {-chosen_shift['coeff']:g}"
    n_of = lambda gs: {name: int((gs == g).sum()) for g, name in enumerate(GROUPS)}  # noqa: E731
    seconds = {"setup": round(t_setup, 1), "actor_candidates": round(sum(c["seconds"] for c in candidates), 1),
               "shift_candidates": round(sum(c["seconds"] for c in shifts), 1), "total": round(time.time() - t0, 1)}
    summary = {
        "model": args.model, "judge": "logit: refusal score of the first answer token > 0", "base": base,
        "tolerance": args.tolerance, "val_frac": args.val_frac, "seed": args.seed, "layers": layers,
        "silhouette_choice": best_sil, "silhouette": sil, "grid": grid, "epochs": args.epochs,
        "refusal_tokens": {str(t): tok.decode([t]) for t in tokens}, "refusal_tokens_note": token_note,
        "n_queries": {"train": n_of(g_tr), "val": n_of(g_va)},
        "split": {part: {name: of(ps, gs, g) for g, name in enumerate(GROUPS)}
                  for part, ps, gs in (("train", p_tr, g_tr), ("val", p_va, g_va))},
        "candidates": candidates, "chosen": chosen,
        "baseline": {"candidates": shifts, "chosen": chosen_shift, "evaluate": steer},
        "fast_logits": head is not None, "seconds": seconds,
        "peak_memory_mib": pl.peak_memory_mib(pl.model_device(model)),
        **pl.metadata(args, list(files.values()))}
    pl.save_json(os.path.join(args.out, "search.json"), summary)
    plot_search(os.path.join(args.out, "search.png"), base, candidates, chosen, shifts, chosen_shift, args.model,
                args.tolerance)
    if chosen is None:
        pl.fail(f"no ACTOR candidate kept harmful validation refusal within {args.tolerance:g} points of the base "
                f"model's {base['harmful']:.1f}%; {os.path.join(args.out, 'search.json')} lists them all (a wider "
                "grid or a larger --tolerance may help); no patch was written")
    state, history, a_init, a_final = kept
    block = pl.decoder_layers(model)[chosen["layer"]]
    block.load_state_dict(state)
    save_patch(args.out, block, a_init, a_final, g_tr, chosen["layer"], args.model, {
        "base_model": args.model, "layer": chosen["layer"], "layer_choice": "search",
        "n_layers": n_layers, "hidden_size": pl.text_config(model).hidden_size, "alpha": chosen["alpha"],
        "origin": args.origin, "lr": chosen["lr"], "epochs": args.epochs, "renew": args.renew, "train": args.train,
        "batches": args.batches, "batch_size": args.batch_size, "block_dtype": str(next(block.parameters()).dtype),
        "load_in_4bit": args.load_in_4bit, "seed": args.seed, "n_queries": n_of(g_tr),
        "data_sha256": {name: pl.sha256(f) for name, f in files.items()}, "silhouette": sil, "epochs_log": history,
        "search": {"val": chosen["val"], "base_val": base, "tolerance": args.tolerance,
                   "n_candidates": len(candidates), "baseline": chosen_shift, "seconds": seconds,
                   "file": "search.json"},
        "train_seconds": chosen["seconds"], "seconds": round(time.time() - t0, 1),
        "peak_memory_mib": summary["peak_memory_mib"], **pl.metadata(args, list(files.values()))})
    print(f"\nchosen: ACTOR layer {chosen['layer']}, alpha {chosen['alpha']:g}, lr {chosen['lr']:g}: "
          f"{fmt(chosen['val'])}")
    if chosen_shift:
        print(f"uniform shift: layer {chosen_shift['layer']}, coeff {chosen_shift['coeff']:g}: "
              f"{fmt(chosen_shift['val'])}\n  reproduce: {steer}")
    else:
        print("uniform shift: no coefficient kept harmful validation refusal; no baseline_direction.pt written")
    print(f"{len(candidates)} ACTOR and {len(shifts)} shift candidates in {seconds['total']:.0f}s "
          f"(setup {seconds['setup']:.0f}s); wrote {args.out}")
    return model


def plot_search(path, base, candidates, chosen, shifts, chosen_shift, model_name, tolerance=None):
    """Pseudo-harmful compliance against harmful refusal on validation: a point per candidate, base and chosen marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    x = lambda c: c["val"]["harmful"]  # noqa: E731
    y = lambda c: 100 - c["val"]["pseudo_harmful"]  # noqa: E731
    layers = sorted({c["layer"] for c in candidates + shifts})
    colors = {l: plt.cm.viridis(i / max(len(layers) - 1, 1)) for i, l in enumerate(layers)}
    for l in layers:
        pts = [c for c in candidates if c["layer"] == l]
        ax.scatter([x(c) for c in pts], [y(c) for c in pts], color=colors[l], marker="o", alpha=0.7,
                   label=f"ACTOR, layer {l}")
        pts = [c for c in shifts if c["layer"] == l]
        ax.scatter([x(c) for c in pts], [y(c) for c in pts], color=colors[l], marker="x", alpha=0.7,
                   label=f"uniform shift, layer {l}")
    if tolerance is not None:
        ax.axvline(base["harmful"] - tolerance, color="gray", ls="--", lw=1, label=f"tolerance ({tolerance:g} points)")
    ax.scatter([x({"val": base})], [y({"val": base})], marker="*", s=220, color="black", label="base model", zorder=5)
    for c, name in ((chosen, "chosen ACTOR"), (chosen_shift, "chosen shift")):
        if c is not None:
            ax.scatter([x(c)], [y(c)], s=240, facecolors="none", edgecolors="red", linewidths=2, zorder=6)
            ax.annotate(name, (x(c), y(c)), textcoords="offset points", xytext=(8, 8), fontsize=8, color="red")
    ax.set_xlabel("harmful refusal, validation (%)")
    ax.set_ylabel("pseudo-harmful compliance, validation (%)")
    ax.set_title(f"ACTOR --search: {os.path.basename(str(model_name).rstrip('/'))} (logit judge)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_patch(out, block, a_init, a_final, groups, layer, model_name, meta):
    """The trained block (actor_layer.safetensors), actor.json (meta plus the projections) and projections.png."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()},
              os.path.join(out, "actor_layer.safetensors.tmp"))
    os.replace(os.path.join(out, "actor_layer.safetensors.tmp"), os.path.join(out, "actor_layer.safetensors"))
    r_hat_init, r_hat_final = refusal_direction(a_init, groups), refusal_direction(a_final, groups)
    before, after = projections(a_init, r_hat_init, groups), projections(a_final, r_hat_init, groups)
    pl.save_json(os.path.join(out, "actor.json"), {
        **meta, "projection_on_initial_r_hat": {"before": before, "after": after},
        "cos_initial_final_r_hat": float(r_hat_init @ r_hat_final)})
    plot_projections(os.path.join(out, "projections.png"), (a_init @ r_hat_init).cpu(), (a_final @ r_hat_init).cpu(),
                     groups, layer, model_name)
    return before, after


# ============================================================================ main
def n_layers_of(model_name, trust_remote_code):
    """The model's number of decoder layers from its config alone (to check --layer before loading weights)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(pl.resolve_model(model_name), trust_remote_code=trust_remote_code)
        return cfg.get_text_config().num_hidden_layers
    except (OSError, ValueError, KeyError):
        return None  # load_model will say what is wrong


def positive_floats(flag, text):
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        vals = []
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        pl.fail(f"{flag} {text!r}: expected a comma list of positive numbers")
    return sorted(set(vals), key=vals.index)


def check_args(args):
    """Every flag, checked before anything is read or loaded. Returns (layer range, search grid or None)."""
    pl.check_model_args(args)
    if args.search and (args.layer, args.alpha, args.lr) != (None, None, None):
        pl.fail("--search chooses the layer, alpha and lr: give the grid with --search-layers, --alphas and --lrs "
                "instead of --layer, --alpha and --lr")
    args.layer = "auto" if args.layer is None else args.layer
    args.alpha = 1.0 if args.alpha is None else args.alpha
    args.lr = 1e-3 if args.lr is None else args.lr
    if args.layer != "auto" and not args.layer.lstrip("-").isdigit():
        pl.fail(f"--layer {args.layer!r}: expected 'auto' or a layer index")
    try:
        layer_range = tuple(float(x) for x in args.layer_range.split(","))
        assert len(layer_range) == 2 and 0 <= layer_range[0] < layer_range[1] <= 1
    except (ValueError, AssertionError):
        pl.fail(f"--layer-range {args.layer_range!r}: expected two fractions of depth, like 0.25,0.75")
    if args.epochs < 1:
        pl.fail(f"--epochs {args.epochs}: must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        pl.fail(f"--lr {args.lr:g}: must be positive")
    if not (math.isfinite(args.alpha) and args.alpha >= 0):
        pl.fail(f"--alpha {args.alpha:g}: must not be negative")
    if args.limit is not None and args.limit < 1:
        pl.fail(f"--limit {args.limit}: must be at least 1 (leave it out to use every query)")
    if not args.search:
        return layer_range, None
    grid = {"alphas": positive_floats("--alphas", args.alphas), "lrs": positive_floats("--lrs", args.lrs),
            "coeffs": positive_floats("--coeffs", args.coeffs)}
    if args.search_layers != "auto" and not all(x.strip().isdigit() for x in args.search_layers.split(",")):
        pl.fail(f"--search-layers {args.search_layers!r}: expected 'auto' or a comma list of layer indices")
    if not 0 < args.val_frac < 1:
        pl.fail(f"--val-frac {args.val_frac:g}: must lie between 0 and 1")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        pl.fail(f"--tolerance {args.tolerance:g}: must not be negative (points of harmful refusal)")
    return layer_range, grid


def read_groups(args, files):
    """The three query groups (0 harmful, 1 pseudo-harmful, 2 benign): prompts and a tensor of group ids."""
    prompts, groups = [], []
    for g, name in enumerate(GROUPS):
        qs = pl.read_prompts(files[name], args.column, args.limit, args.seed)
        prompts += qs
        groups += [g] * len(qs)
    return prompts, torch.tensor(groups)


OUTPUTS = ("actor_layer.safetensors", "actor.json", "projections.png")


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        if args.search:
            pl.fail("--merge and --search do not go together")
        return merge(args)
    args.model = args.model or pl.default_model()
    layer_range, grid = check_args(args)
    outputs = OUTPUTS + (SEARCH_OUTPUTS if args.search else ())
    pl.prepare_out(args.out, outputs, args.overwrite)
    pl.seed_everything(args.seed)
    t0 = time.time()

    # ---- data, checked before any work: three query groups (0 harmful, 1 pseudo-harmful, 2 benign)
    files = {"harmful": args.harmful, "pseudo_harmful": args.pseudo_harmful, "benign": args.benign}
    prompts, groups = read_groups(args, files)
    n_layers = n_layers_of(args.model, args.trust_remote_code)
    if n_layers is not None:
        for flag, ls in (("--layer", [args.layer] if args.layer != "auto" else []),
                         ("--search-layers", args.search_layers.split(",") if args.search and
                          args.search_layers != "auto" else [])):
            for l in ls:
                if not 0 <= int(l) < n_layers:
                    pl.fail(f"{flag} {l} is out of range: this model has layers 0..{n_layers - 1}")
    if args.search:
        return search(args, prompts, groups, files, layer_range, grid, t0)

    # ---- model (frozen everywhere)
    model, tok = pl.load(args)
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
    cache_mb = sum(t.numel() * t.element_size() for _, a, kw in cache for t in pl.tensors_in((a, kw))) / 2 ** 20

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

    # ---- outputs: the trained block only, its metadata, the picture of what ACTOR did
    before, after = save_patch(args.out, block, a_init, a_final, groups, layer, args.model, {
        "base_model": args.model, "layer": layer, "layer_choice": "silhouette" if sil else "fixed",
        "n_layers": n_layers, "hidden_size": pl.text_config(model).hidden_size, "alpha": args.alpha,
        "origin": args.origin, "lr": args.lr, "epochs": args.epochs, "renew": args.renew, "train": args.train,
        "batches": args.batches, "batch_size": args.batch_size,
        "block_dtype": str(next(block.parameters()).dtype), "load_in_4bit": args.load_in_4bit, "seed": args.seed,
        "n_queries": {name: int((groups == g).sum()) for g, name in enumerate(GROUPS)},
        "data_sha256": {name: pl.sha256(f) for name, f in files.items()},
        "silhouette": sil, "epochs_log": history,
        "cache_mib": round(cache_mb, 2), "train_seconds": round(t_train, 2), "seconds": round(time.time() - t0, 1),
        "peak_memory_mib": pl.peak_memory_mib(pl.model_device(model)), **pl.metadata(args, list(files.values()))})

    print(f"\nACTOR on layer {layer}, alpha {args.alpha}, lr {args.lr}, {args.epochs} epochs in {t_train:.1f}s")
    print(f"{'group':>15} {'n':>4} {'proj before':>12} {'proj after':>11}   (onto the initial R_hat)")
    for g, name in enumerate(GROUPS):
        print(f"{name:>15} {int((groups == g).sum()):>4} {before[name]:>12.2f} {after[name]:>11.2f}")
    print(f"\nwrote {', '.join(os.path.join(args.out, o) for o in OUTPUTS)} in {time.time() - t0:.0f}s")
    return model  # with block l* trained in place (for tests and notebooks)


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
