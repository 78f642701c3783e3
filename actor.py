"""actor.py: ACTOR, cut over-refusal by fine-tuning one layer along the refusal direction, "just enough".

Dabas et al., ICML 2025, "Just Enough Shifts: Mitigating Over-Refusal in Aligned Language Models with Targeted
Representation Fine-Tuning" (arXiv 2507.04250). The text reachable here holds the abstract and introduction only; the
method below is as two independent summaries of the paper's method section give it (they agree), and every place
where the code goes beyond them is tagged [choice].

    a = a_{l*}(theta, q)                       the output of one middle layer l* at the query's last token
    r_hat = R / |R|,  R = mean(a | harmful) - mean(a | harmless)      the refusal direction at l* (the paper's R_hat)
    a_tgt = a - alpha Proj_R(a)                for harmless (the paper's benign) and pseudo-harmful queries
    a_tgt = a + alpha Proj_R(a)                for harmful queries (towards refusal)
    L = 1 - cos(a(theta), a_tgt)               averaged over queries; only layer l* is trained
    r_hat and the targets are computed again from the current weights after each update (--renew step)

The shift is proportional to each query's own projection: just enough. No responses, no generation. l* is the layer
whose outputs best separate harmful from harmless queries (silhouette score).

[choice] Two departures from the formula as the summaries print it, both measured on the test model
(results/actor.md): the projection is measured from the harmless mean and only its refusal side counts (--origin, see
targets()), and r_hat and the targets are made once, from the initial weights (--renew never). Renewed from the
current activations, every target moves again from wherever the last update left its query: the shifts compound,
there is no fixed point, and refusal is destroyed (--renew step: 0% refused on every set, HarmBench 92.2% before, on
the test model, 3 seeds, logit judge; targets made once keep HarmBench at 96.9%).

    python actor.py --out runs/actor                                   # SmolLM2 and the data/ prompt sets
    python actor.py --model M --pseudo-harmful FILE --layer auto --alpha 1 --epochs 3 --out runs/actor
    python evaluate.py --model M --patch runs/actor --benchmark xstest --data-dir ../shared/benchdata --out runs/eval
    python actor.py --merge runs/actor --out runs/actor-merged        # a full model with the patch applied
    python actor_search.py --out runs/actor_search                     # layer, alpha and lr chosen on held-out queries

The cost of one layer: everything below l* is frozen, so the inputs of layer l* never change. They are computed once
(hidden states, attention mask, rotary embeddings: whatever the layer receives) and cached; training, and the renewal
of r_hat and the targets, run layer l* alone. With --load-in-4bit the frozen model stays in 4-bit and layer l* is
trained as a dequantized copy.
"""
import argparse
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import artifacts
import chat
import cli
import inference
import loading
import rundir
import runrecord

GROUPS = ("harmful", "pseudo_harmful", "harmless")  # group ids 0, 1, 2


# ============================================================================ the method
# R = mean(a | harmful) - mean(a | harmless), r_hat = R / |R| (the same lines as in directions.py and procon.py;
# tests/test_layout.py keeps the copies equal)
def difference_in_means(acts_a, acts_b):
    """mean(acts_a) - mean(acts_b) over the first axis (the prompts), in float64, returned in float32."""
    diff = (acts_a.double().mean(0) - acts_b.double().mean(0)).float()
    return cli.check_finite(diff, "the difference in means")  # NaN or inf activations: the likely flag is named


def unit(v, what="direction"):
    """v / |v| along the last axis; a zero vector has no direction, and is an error, not a silent 0."""
    norm = cli.check_finite(v.norm(dim=-1, keepdim=True), f"the length of the {what}")  # flags to blame named
    if (norm <= 1e-8 * max(1.0, v.abs().max().item())).any():
        cli.fail(f"the {what} is zero: the two prompt groups give the same mean activation")
    return v / norm


# r_hat: the refusal direction at l*
def refusal_direction(a, groups):
    """r_hat = R / |R|, R = mean(a | harmful) - mean(a | harmless).

    [choice] The harmless side is the harmless group only: pseudo-harmful queries are the ones to be moved, so letting
    them define the direction they are moved along would be circular."""
    return unit(difference_in_means(a[groups == 0], a[groups == 2]), "refusal direction R (harmful - harmless)")


# a_tgt: the target of each query
def targets(a, r_hat, groups, alpha, origin=None):
    """a_tgt = a -/+ alpha p r_hat (minus: harmless and pseudo-harmful; plus: harmful), p the query's projection.

    The summaries write p = a . r_hat (origin None). Measured from 0, its sign depends on where the activations sit: on
    the over-refusing SmolLM2 all three groups project negatively at middle layers, and that formula would then push
    harmless queries towards refusal and harmful ones away. [choice] Given an origin (a point: the harmless mean),
    p = max((a - origin) . r_hat, 0): pseudo-harmful queries move to the origin's level at alpha 1, harmful ones
    further out, and queries already below it keep their activation as target (they anchor the layer)."""
    p = a @ r_hat if origin is None else ((a - origin) @ r_hat).clamp(min=0)
    sign = torch.where(groups.to(a.device) == 0, 1.0, -1.0)
    return a + (sign * alpha * p).unsqueeze(-1) * r_hat


def origin_of(kind, a, a_init, groups):
    """Where projections are measured from (--origin): None (zero, as the summaries print it), the harmless mean of the
    activations the targets are made from (harmless), or the harmless mean under the initial weights, fixed
    (harmless-initial)."""
    return {"zero": None, "harmless": a[groups == 2].mean(0), "harmless-initial": a_init[groups == 2].mean(0)}[kind]


# L: the loss
def loss_fn(a, a_tgt):
    """L = 1 - cos(a(theta), a_tgt), averaged over queries."""
    return (1 - F.cosine_similarity(a, a_tgt, dim=-1)).mean()


def train_epoch(block, cache, a_tgt, opt, order, renew=None):
    """One pass over the cached batches in the given order, layer l* forward and backward; returns the mean loss.
    With renew (--renew step), the targets are made again from the current weights before every update."""
    total, n = 0.0, 0
    for b in order:
        a_tgt = renew() if renew else a_tgt
        idx = cache[b][0]
        a = block_forward(block, cache[b])
        loss = loss_fn(a, a_tgt[idx].to(a.device))
        if not torch.isfinite(loss):  # the flags most likely to blame are named
            cli.check_finite(loss, "the loss", " (nothing was written)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, n = total + loss.item() * len(idx), n + len(idx)
    return total / n


def actor(block, cache, groups, alpha, lr, epochs, origin="harmless", renew="never", train="all", seed=0, log=print):
    """The loop: before each epoch r_hat and the targets are made from the initial weights of layer l* (renew
    "epoch": from its current weights; "step": before every update too); then one pass of AdamW over the cached
    batches (fixed batches, their order shuffled with the seed). Returns the epoch log and the activations before and
    after training."""
    opt = torch.optim.AdamW(trainable(block, train), lr=lr, weight_decay=0.0)  # [choice] AdamW, no weight decay
    a_init = activations(block, cache, len(groups))
    a, history = a_init, []
    made_from = lambda src: targets(src, refusal_direction(src, groups), groups, alpha,  # noqa: E731
                                    origin_of(origin, src, a_init, groups))
    for epoch in range(epochs):
        src = a_init if renew == "never" else a  # the activations r_hat and the targets are made from
        r_hat, a_tgt = refusal_direction(src, groups), made_from(src)
        order = list(range(len(cache)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        every_step = (lambda: made_from(activations(block, cache, len(groups)))) if renew == "step" else None
        loss = train_epoch(block, cache, a_tgt, opt, order, every_step)
        history.append({"epoch": epoch + 1, "loss": loss, "mean_projection": mean_projections(a, r_hat, groups)})
        log(f"epoch {epoch + 1}/{epochs}: loss {loss:.5f}  mean projection onto r_hat (start of epoch): " +
            "  ".join(f"{k} {v:+.2f}" for k, v in history[-1]["mean_projection"].items()))
        a = activations(block, cache, len(groups))
    block.requires_grad_(False)
    return history, a_init, a


def mean_projections(a, r_hat, groups):
    """Mean projection a . r_hat of each query group."""
    return {name: (a[groups == g] @ r_hat).mean().item() for g, name in enumerate(GROUPS)}


def trainable(block, which):
    """The parameters of block l* that ACTOR trains ([choice] --train: all by default; the paper trains "a single
    layer" and does not say which of its parts)."""
    block.requires_grad_(False)
    for name, p in block.named_parameters():
        if which == "all" or (which == "mlp" and "mlp" in name) or (which == "attn" and "attn" in name):
            p.requires_grad_(True)
    params = [p for p in block.parameters() if p.requires_grad]
    if not params:
        cli.fail(f"--train {which}: block l* has no such parameters")
    return params


# l*: the layer whose outputs best separate harmful from harmless queries
def silhouette_layer(model, tok, prompts, groups, band, batch_size):
    """l*: the best silhouette score of harmful vs harmless last-token outputs among the layers of `band` (the paper
    chooses a middle layer by t-SNE and silhouette; [choice] --layer-range bounds 'middle'). Returns (layer, scores)."""
    keep = groups != 1
    kept = [p for p, k in zip(prompts, keep.tolist()) if k]
    acts = inference.capture(model, tok, kept, 1, batch_size, "choosing layer")
    labels = (groups[keep] == 0).long()
    scores = {l: silhouette(acts[:, l + 1, -1], labels) for l in band}  # index l + 1: the output of layer l
    return max(scores, key=scores.get), scores


def silhouette(x, labels):
    """Mean silhouette score of two clusters (Euclidean): (b - a) / max(a, b) per point, a the mean distance to its
    own cluster, b to the other. The paper's choice of layer (the same lines as directions.py's fallback)."""
    dist = torch.cdist(x.double(), x.double())
    scores = []
    for c in (0, 1):
        own, other = labels == c, labels != c
        a = dist[own][:, own].sum(1) / (own.sum() - 1).clamp(min=1)
        b = dist[own][:, other].mean(1)
        scores.append((b - a) / torch.maximum(a, b).clamp(min=1e-12))
    return torch.cat(scores).mean().item()


# ============================================================================ a: block l* alone on its cached inputs
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
    block = loading.decoder_layers(model)[layer]
    texts = chat.format_chat(tok, prompts)
    if mix_seed is None:
        batches = chat.length_batches(tok, texts, batch_size)
    else:
        order = list(range(len(texts)))
        random.Random(mix_seed).shuffle(order)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    device = device or loading.model_device(model)
    cache, idx = [], None

    def grab(module, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        kept = {k: move_tensors(v, device) for k, v in kwargs.items()}
        cache.append((idx, move_tensors(tuple(args), device), kept))
        raise _Stop

    with inference.hooks([(block, "pre", grab)]):
        for idx in tqdm(batches, desc=f"caching inputs of layer {layer}", leave=False):
            try:
                model(**chat.tokenize(tok, [texts[i] for i in idx], loading.model_device(model)), use_cache=False)
            except _Stop:
                pass
    return cache


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


def run_block(block, args, kwargs, dtype):
    """One decoder block on cached inputs, computed in dtype on the block's device: its output [batch, T, d]."""
    device = loading.model_device(block)  # where it computes (its weights may wait on the CPU or disk: --device-map)
    kwargs = {k: move_tensors(v, device, None if k == "attention_mask" else dtype) for k, v in kwargs.items()}
    mask = kwargs.get("attention_mask")
    if torch.is_tensor(mask) and mask.is_floating_point() and mask.dtype != dtype:  # an additive mask
        kwargs["attention_mask"] = mask.clamp(min=torch.finfo(dtype).min).to(dtype)
    out = block(*move_tensors(args, device, dtype), use_cache=False, **kwargs)
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


def trainable_block(model, layer, block_dtype="auto"):
    """Block l* as a trainable copy: dequantized from 4-bit if need be, in the chosen dtype (auto: the model's)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(block_dtype)
    block = loading.dequantize_block(loading.decoder_layers(model)[layer], dtype)
    return block.to(dtype) if dtype is not None else block


# ============================================================================ main
def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return artifacts.merge("patch", args.merge, args)
    args.model = args.model or loading.default_model()
    cli.check_model_args(args)
    runrecord.seed_everything(args.seed)
    t0 = time.time()

    # 1. the three query groups (0 harmful, 1 pseudo-harmful, 2 harmless) and the layers l* may be chosen from
    files = {name: getattr(args, name) for name in GROUPS}
    prompts, groups = read_groups(files, args.column, args.limit, args.seed)
    band = layer_band(args, artifacts.shape_of(artifacts.model_config(args.model, args.trust_remote_code))[2])
    with rundir.run_folder(args.out, OUTPUTS, args.overwrite, known=KNOWN, read=rundir.reads(args)) as work:
        # 2. the model, frozen everywhere; l*, the best silhouette in the band (or fixed)
        model, tok = loading.load(args)
        layer, sil = (band[0], {}) if args.layer != "auto" else silhouette_layer(model, tok, prompts, groups, band,
                                                                             args.batch_size)

        # 3. the cache: the inputs of block l*, computed once (the layers above l* are not run)
        cache = cache_block_inputs(model, tok, prompts, layer, args.batch_size,
                                      "cpu" if args.cache_device == "cpu" else None,
                                      args.seed if args.batches == "mixed" else None)
        cache_mib = sum(t.numel() * t.element_size() for _, a, kw in cache for t in tensors_in((a, kw))) / 2 ** 20
        print(f"ACTOR on layer {layer} of {len(loading.decoder_layers(model))} ({'silhouette' if sil else 'fixed'}): "
              f"{', '.join(f'{int((groups == g).sum())} {n}' for g, n in enumerate(GROUPS))} queries, "
              f"cache {cache_mib:.1f} MiB on {args.cache_device}")

        # 4. ACTOR: block l* as a trainable copy, trained on the cached inputs towards the renewed targets
        block = trainable_block(model, layer, args.block_dtype)
        t_train = time.time()
        history, a_init, a_final = actor(block, cache, groups, args.alpha, args.lr, args.epochs, args.origin,
                                         args.renew, args.train, args.seed)
        t_train = time.time() - t_train

        # 5. outputs: the trained block, its metadata, the picture of what ACTOR did
        meta = {"base_model": args.model, **artifacts.record(args.model, model.config), "layer": layer,
                "activation": f"output of layer {layer}", "layer_choice": "silhouette" if sil else "fixed",
                "silhouette": sil, "epochs_log": history,
                **{k: getattr(args, k) for k in ("alpha", "origin", "lr", "epochs", "renew", "train", "batches",
                                                  "batch_size", "load_in_4bit", "seed")},
                "block_dtype": str(next(block.parameters()).dtype), "cache_mib": round(cache_mib, 2),
                "n_queries": {name: int((groups == g).sum()) for g, name in enumerate(GROUPS)},
                "data_sha256": {name: runrecord.sha256(f) for name, f in files.items()},
                "train_seconds": round(t_train, 2),
                "seconds": round(time.time() - t0, 1),
                "peak_memory_mib": loading.peak_memory_mib(loading.model_device(model)),
                **runrecord.metadata(args, list(files.values()))}
        before, after = save(work, block, a_init, a_final, groups, meta)
    print(f"\nACTOR on layer {layer}, alpha {args.alpha}, lr {args.lr}, {args.epochs} epochs in {t_train:.1f}s")
    print(f"{'group':>15} {'n':>4} {'proj before':>12} {'proj after':>11}   (onto the initial r_hat)")
    for g, name in enumerate(GROUPS):
        print(f"{name:>15} {int((groups == g).sum()):>4} {before[name]:>12.2f} {after[name]:>11.2f}")
    print(f"\nwrote {', '.join(os.path.join(args.out, o) for o in OUTPUTS)} in {time.time() - t0:.0f}s")
    return model  # with block l* trained in place (for tests and notebooks)


def read_groups(files, column, limit, seed):
    """The three query groups (0 harmful, 1 pseudo-harmful, 2 harmless): prompts and a tensor of group ids."""
    found = {name: chat.read_prompts(files[name], column, limit, seed) for name in GROUPS}
    chat.check_groups({"harmful": found["harmful"], "harmless": found["harmless"]})
    return sum(found.values(), []), torch.tensor([g for g, name in enumerate(GROUPS) for _ in found[name]])


def layer_band(args, n_layers):
    """The layers l* may be: --layer, or those within --layer-range of depth; either must exist in the model."""
    if args.layer != "auto":
        if not 0 <= int(args.layer) < n_layers:
            cli.fail(f"--layer {args.layer} is out of range: this model has layers 0..{n_layers - 1}")
        return [int(args.layer)]
    if len(args.layer_range) != 2 or args.layer_range[0] >= args.layer_range[1]:
        cli.fail(f"--layer-range {args.layer_range}: expected two fractions of depth, low then high, like 0.25,0.75")
    lo, hi = args.layer_range
    band = [l for l in range(n_layers) if lo * n_layers <= l < hi * n_layers]
    if not band:
        cli.fail(f"--layer-range {lo:g},{hi:g} holds none of this model's {n_layers} layers; widen it")
    return band


# ============================================================================ outputs
def save(work, block, a_init, a_final, groups, meta):
    """The patch (save_patch: the trained block and actor.json, with where the groups sat along the initial
    r_hat before and after) and projections.png. Returns the mean projections before and after."""
    r_hat_init, r_hat_final = refusal_direction(a_init, groups), refusal_direction(a_final, groups)
    before, after = mean_projections(a_init, r_hat_init, groups), mean_projections(a_final, r_hat_init, groups)
    save_patch(work, block, {**meta, "projection_on_initial_r_hat": {"before": before, "after": after},
                                       "cos_initial_final_r_hat": float(r_hat_init @ r_hat_final)})
    plot_projections(os.path.join(work, "projections.png"), (a_init @ r_hat_init).cpu(), (a_final @ r_hat_init).cpu(),
                     groups, meta["layer"], meta["base_model"])
    return before, after


def save_patch(folder, block, meta):
    """Block l*'s trained weights, and actor.json (`meta`). What applying the patch needs (its layer, its model) rides
    in the safetensors header too, so that weights and what they fit can never disagree."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
    fits = {k: meta.get(k) for k in ("layer", "base_model", "model_key", "model_sha256", "model_files", "arch",
                                     "hidden_size", "n_layers")}
    path = os.path.join(folder, artifacts.PATCH_WEIGHTS)
    with runrecord.save_guard(path, path):
        save_file(state, path, metadata={"actor": runrecord.save_json_text(fits, path)})
    runrecord.save_json(os.path.join(folder, artifacts.PATCH_META), meta)


def plot_projections(path, before, after, groups, layer, model_name):
    """Histograms of each group's projection onto the initial r_hat, before and after ACTOR."""
    plt = runrecord.pyplot()
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
    axes[1].set_xlabel(f"projection onto r_hat (output of layer {layer}, last token; r_hat before training)")
    fig.suptitle(f"ACTOR: {os.path.basename(str(model_name).rstrip('/'))}", fontsize=10)
    runrecord.save_figure(fig, path)


# ============================================================================ arguments
OUTPUTS = (artifacts.PATCH_WEIGHTS, artifacts.PATCH_META, "projections.png")
KNOWN = OUTPUTS + ("search.json", "search.png", "baseline_direction.pt")  # an actor_search.py run's, replaced too


def layer_arg(text):
    """--layer: 'auto' or a layer index."""
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'auto' or a layer index")
    return text if text == "auto" else int(text)


def add_actor_args(p):
    """ACTOR's flags (actor_search.py shares them): the method's, then data, model, memory and outputs. Returns the
    method and outputs groups, for each script's own flags."""
    method = g = p.add_argument_group("method (ACTOR)")
    g.add_argument("--layer-range", type=cli.listed(cli.number(lo=0, hi=1)), default=[0.25, 0.75],
                   help="layers l* is chosen from, as two fractions of depth ([choice]: the paper chooses 'a middle "
                   "layer')")
    g.add_argument("--origin", choices=("harmless", "harmless-initial", "zero"), default="harmless",
                   help="where projections are measured from ([choice]; see targets()): the harmless mean of the "
                   "activations the targets are made from, the harmless mean under the initial weights, or 0 (the "
                   "formula as the summaries print it)")
    g.add_argument("--epochs", type=cli.count(1), default=3,
                   help="rounds of training; r_hat and the targets are made before each (3: the epochs of the paper's "
                   "timing, as the summaries give it)")
    g.add_argument("--renew", choices=("never", "epoch", "step"), default="never",
                   help="make r_hat and the targets from the initial weights, once ([choice]: targets with a fixed "
                   "point; see the docstring), or from the current weights before every epoch, or before every update "
                   "(the paper renews them after each update)")
    g.add_argument("--train", choices=("all", "mlp", "attn"), default="all",
                   help="which parameters of layer l* are trained ([choice] all)")
    g.add_argument("--batches", choices=("length", "mixed"), default="length",
                   help="training batches ([choice]): sorted by length (least padding; most batches then hold one "
                   "query group) or seeded random mixes of the groups (measured: no steadier, results/actor.md)")
    g = p.add_argument_group("data")
    g.add_argument("--pseudo-harmful", default=os.path.join(cli.DATA, "pseudo_harmful.json"),
                   help="harmless queries that look harmful: moved away from refusal")
    g.add_argument("--harmful", default=os.path.join(cli.DATA, "harmful.json"),
                   help="harmful queries: moved towards refusal")
    g.add_argument("--harmless", default=os.path.join(cli.DATA, "harmless.json"),
                   help="ordinary harmless queries (the paper's benign ones): moved away from refusal, and the "
                   "harmless side of r_hat")
    g.add_argument("--column", default=None, help="prompt column of the query files (default: the first known name)")
    g.add_argument("--limit", type=cli.count(1), default=None, help="at most N queries per group (a seeded sample)")
    cli.add_model_args(p)
    p.set_defaults(model=None)  # filled in by main; with --merge the base model comes from the patch
    g = cli.add_memory_args(p)
    g.add_argument("--block-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="dtype layer l* is trained in (auto: the model's, bf16 for a 4-bit model on GPU)")
    g.add_argument("--cache-device", choices=("model", "cpu"), default="model",
                   help="keep the cached inputs of layer l* on the model's device or in CPU memory")
    return method, cli.add_out_args(p, "runs/actor")


def parse_args(argv=None):
    p = cli.parser(__doc__)
    m, g = add_actor_args(p)
    m.add_argument("--layer", type=layer_arg, default="auto", help="l*: 'auto' (best silhouette) or a layer "
                   "index; layer l is decoder block l (0-based) and ACTOR trains it on its output, the stream leaving "
                   "it (directions.py and procon.py read a layer's input, the stream entering it)")
    m.add_argument("--alpha", type=cli.number(lo=0), default=1.0, help="ACTOR's alpha: the size of the shift, in "
                   "units of the query's projection ([choice] 1: pseudo-harmful queries move to the origin's level); "
                   "procon.py's --alpha is ProCon's alpha, the constraint's weight")
    m.add_argument("--lr", type=cli.number(above=0), default=1e-3,
                   help="AdamW learning rate (not in the summaries of the paper: [choice], measured in "
                   "results/actor.md)")
    g.add_argument("--merge", default=None, metavar="PATCH_DIR",
                   help="instead of training: write the unquantized base model with this patch applied to --out")
    g.add_argument("--other-model", action="store_true",
                   help="with --merge: apply a patch made on another model than --model")
    return p.parse_args(argv)


if __name__ == "__main__":
    cli.run_main(main)
