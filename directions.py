"""directions.py: find a chat model's refusal direction and choose its layer.

Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction" (arXiv 2406.11717). The same
difference in means is the r-direction of ProCon (procon.py) and the refusal direction of ACTOR (actor.py).

    python directions.py --out runs/direction                         # SmolLM2 and the data/ prompt sets
    python directions.py --model Qwen/Qwen2.5-7B-Instruct --load-in-4bit --harmful H.json --harmless B.json --out D

The method, in the paper's order: the difference in means at every layer and post-instruction position (sec. 2.3),
the refusal score (sec. 2.4), directional ablation and activation addition (sec. 2.5), the selection of one direction
by bypass, induce and KL scores (sec. 2.4 and app. C), and the causal check of the chosen one. Every place where the
code chooses what the paper leaves open carries the tag [choice].
"""
import argparse
import os
import random
import sys
import time

import torch
from tqdm import tqdm

import keywords
import plumbing as pl


# ============================================================================ difference in means (Arditi sec. 2.3)
def difference_in_means(acts_harmful, acts_harmless):
    """r_{i,l} = mu_{i,l} - nu_{i,l}: mean harmful minus mean harmless activation, per layer l and position i.

    acts_*: [n, L + 1, positions, d] from pl.capture (index l is the input to decoder layer l). Returns [L, positions,
    d], the raw difference (its norm is what activation addition adds), computed in float64 and stored in float32.
    """
    n_layers = acts_harmful.shape[1] - 1
    return (acts_harmful.double().mean(0) - acts_harmless.double().mean(0)).float()[:n_layers]


def unit(v):
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


# ============================================================================ the refusal score (Arditi sec. 2.4)
def refusal_tokens(model, tokenizer, harmful, harmless, batch_size=16, k=4, max_new_tokens=16):
    """Refusal tokens found from the model itself (the paper lists them by hand per model family).

    The first tokens of the model's answers to harmful prompts that the keyword judge calls refusals, ranked by how
    often they open such an answer, keeping only tokens that open refusals at least twice as often as they open the
    model's compliant answers to harmless prompts. [choice] The factor 2: dropping every token that opens any
    compliant answer would drop "I", which opens both "I'm sorry" and "I'd be happy to".
    Returns (token ids, number of harmful prompts refused).
    """
    answers_harmful = pl.generate(model, tokenizer, harmful, max_new_tokens, batch_size,
                                  desc="refusal tokens (harmful)")
    answers_harmless = pl.generate(model, tokenizer, harmless, max_new_tokens, batch_size,
                                   desc="refusal tokens (harmless)")

    def first(text):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return ids[0] if ids else None

    def shares(answers):
        counts = {}
        for a in answers:
            counts[first(a)] = counts.get(first(a), 0) + 1
        return {t: c / max(len(answers), 1) for t, c in counts.items()}

    refused = [a for a in answers_harmful if keywords.is_refusal(a) and first(a) is not None]
    compliant = [a for a in answers_harmless if not keywords.is_refusal(a) and first(a) is not None]
    in_refusals, in_compliant = shares(refused), shares(compliant)
    ranked = sorted((t for t in in_refusals if in_refusals[t] >= 2 * in_compliant.get(t, 0.0)),
                    key=lambda t: -in_refusals[t])
    return ranked[:k], len(refused)


def fallback_refusal_tokens(tokenizer):
    """For a model that does not refuse: the model's own tokens that open the usual refusal phrases."""
    openers = ("I", "Sorry", "As", "Unfortunately")
    return sorted({tokenizer(o, add_special_tokens=False).input_ids[0] for o in openers})


def refusal_score(logprobs, tokens):
    """Refusal score: log-odds that the next token is a refusal token, log p - log(1 - p), p = sum of their probs."""
    log_p = torch.logsumexp(logprobs[:, tokens], dim=-1)
    return log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))


def kl_div(logp, logq):
    """Mean KL(p || q) over prompts, from next-token log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1).mean().item()


# ============================================================================ ablation and addition (Arditi sec. 2.5)
def _project_out(h, r_hat):
    r = r_hat.to(h.device, h.dtype)
    return h - (h @ r).unsqueeze(-1) * r


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
    """Directional ablation: x <- x - (x . r_hat) r_hat for every write to the residual stream, at every position.

    As in the paper: the direction is projected out of the input of every decoder block (which covers the embeddings)
    and out of the output of every attention and MLP sublayer, so no sublayer ever reads a component along r_hat, not
    even the MLP reading what its own block's attention just wrote.
    """
    def pre(module, args, kwargs):
        return pl.with_hidden(args, kwargs, _project_out(pl.hidden_of(args, kwargs), r_hat))

    def post(module, args, output):
        if isinstance(output, tuple):
            return (_project_out(output[0], r_hat),) + tuple(output[1:])
        return _project_out(output, r_hat)

    pairs = []
    for block in pl.decoder_layers(model):
        writes = residual_writes(block)
        if not writes:  # an unknown layout: block boundaries only, and say so
            print(f"warning: {type(block).__name__}: attention and MLP not found; the direction is ablated at block "
                  "inputs and outputs only", file=sys.stderr)
            writes = [block]
        pairs += [(block, "pre", pre)] + [(w, "post", post) for w in writes]
    return pairs


def addition_hooks(model, vector, layer, coeff=1.0):
    """Activation addition: x <- x + coeff * r at the input of one layer, at every position (coeff 1: the paper's)."""
    def pre(module, args, kwargs):
        h = pl.hidden_of(args, kwargs)
        return pl.with_hidden(args, kwargs, h + coeff * vector.to(h.device, h.dtype))

    return [(pl.decoder_layers(model)[layer], "pre", pre)]


# ============================================================================ selection (Arditi sec. 2.4, app. C)
def silhouette(x, labels):
    """Mean silhouette score of two clusters (Euclidean), computed in torch: (b - a) / max(a, b) per point.
    (ACTOR's layer choice; here the fallback when the model refuses too little for the refusal score.)"""
    dist = torch.cdist(x.double(), x.double())
    scores = []
    for c in (0, 1):
        own, other = labels == c, labels != c
        a = dist[own][:, own].sum(1) / (own.sum() - 1).clamp(min=1)
        b = dist[own][:, other].mean(1)
        scores.append((b - a) / torch.maximum(a, b).clamp(min=1e-12))
    return torch.cat(scores).mean().item()


def causal_scores(model, tok, r, r_hat, layer, val, base_harmless, tokens, batch_size):
    """The three scores of one candidate direction on held-out prompts:
        bypass_score: mean refusal score of harmful prompts with r_hat ablated everywhere (lower: it mediates refusal)
        induce_score: mean refusal score of harmless prompts with r added at its layer (> 0: it induces refusal)
        kl_score:     KL of harmless next-token distributions, ablated vs not (small: ablation changes little else)
    """
    ablate = ablation_hooks(model, r_hat)
    bypass = refusal_score(pl.last_logits(model, tok, val["harmful"], batch_size, ablate, "bypass"), tokens)
    ablated_harmless = pl.last_logits(model, tok, val["harmless"], batch_size, ablate, "kl")
    induce = refusal_score(pl.last_logits(model, tok, val["harmless"], batch_size,
                                          addition_hooks(model, r, layer), "induce"), tokens)
    return {"bypass": bypass.mean().item(), "induce": induce.mean().item(),
            "kl": kl_div(base_harmless, ablated_harmless)}


def select(candidates, scores, n_layers, prune_frac, max_kl):
    """The paper's filter and choice: drop layers in the last prune_frac of depth, KL > max_kl and induce <= 0; take
    the lowest bypass score. None when no candidate passes."""
    max_layer = int(n_layers * (1 - prune_frac))
    ok = [c for c in candidates if c[0] < max_layer and scores[c]["kl"] <= max_kl and scores[c]["induce"] > 0]
    return min(ok, key=lambda c: scores[c]["bypass"]) if ok else None


# ============================================================================ direction files
def load_direction(path, model=None):
    """Read a direction.pt written by this script, checking it matches the model it will be used with."""
    if not os.path.isfile(path):
        pl.fail(f"{path}: no such direction file")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        pl.fail(f"{path}: not a direction file ({type(e).__name__})")
    if not isinstance(d, dict) or "direction" not in d or "layer" not in d:
        pl.fail(f"{path}: not a direction file (no 'direction' and 'layer')")
    if model is not None:
        cfg = pl.text_config(model)
        n_layers = d.get("n_layers", cfg.num_hidden_layers)
        if d["direction"].shape[-1] != cfg.hidden_size or n_layers != cfg.num_hidden_layers:
            pl.fail(f"{path} was extracted from {d.get('model')} (hidden size {d['direction'].shape[-1]}, "
                    f"{d.get('n_layers')} layers), which does not match this model (hidden size {cfg.hidden_size}, "
                    f"{cfg.num_hidden_layers} layers)")
    return d


# ============================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_model_args(p)
    p.add_argument("--harmful", default=os.path.join(pl.DATA, "harmful.json"), help="file of harmful prompts")
    p.add_argument("--harmless", default=os.path.join(pl.DATA, "harmless.json"), help="file of harmless prompts")
    p.add_argument("--column", default=None, help="column holding the prompt (default: the first known name)")
    p.add_argument("--n-train", type=int, default=64, help="prompts per class for the difference in means")
    p.add_argument("--n-val", type=int, default=32, help="held-out prompts per class for layer selection and the check")
    p.add_argument("--positions", type=int, default=1, help="last k post-instruction template tokens to consider")
    p.add_argument("--select", choices=("silhouette", "refusal"), default="refusal",
                   help="layer choice: best harmful/harmless separation (ACTOR) or Arditi's refusal-score selection")
    p.add_argument("--layer", type=int, default=None, help="use this layer instead of selecting one")
    p.add_argument("--prune-frac", type=float, default=0.2, help="Arditi: skip the last fraction of layers")
    p.add_argument("--max-kl", type=float, default=0.1,
                   help="Arditi: discard directions whose ablation KL exceeds this")
    p.add_argument("--min-refusals", type=int, default=4,
                   help="fewest refused harmful prompts needed to find refusal tokens; else fall back to silhouette")
    p.add_argument("--out", default="runs/direction", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    return p.parse_args(argv)


OUTPUTS = ("direction.pt", "direction.json", "layers.png")


def check_args(args):
    """Every flag that needs no model, checked before any work."""
    pl.check_model_args(args)
    for flag, v, low in (("--n-train", args.n_train, 2), ("--n-val", args.n_val, 1), ("--positions", args.positions, 1),
                         ("--min-refusals", args.min_refusals, 0)):
        if v < low:
            pl.fail(f"{flag} {v}: must be at least {low}")
    if not 0 <= args.prune_frac < 1:
        pl.fail(f"--prune-frac {args.prune_frac}: must be in [0, 1)")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    pl.prepare_out(args.out, OUTPUTS, args.overwrite)
    pl.seed_everything(args.seed)
    t0 = time.time()

    # 1. data: per class, train prompts for the means and held-out prompts for selection and the causal check
    train, val = {}, {}
    for name, path in (("harmful", args.harmful), ("harmless", args.harmless)):
        prompts = pl.read_prompts(path, args.column)
        random.Random(args.seed).shuffle(prompts)
        if len(prompts) < 4:
            pl.fail(f"{path}: {len(prompts)} prompts; at least 4 are needed (2 for the mean, 2 held out)")
        n_train = min(args.n_train, len(prompts) - min(args.n_val, len(prompts) // 4))
        train[name], val[name] = prompts[:n_train], prompts[n_train:n_train + args.n_val]

    # 2. model
    model, tok = pl.load(args)
    n_layers = pl.text_config(model).num_hidden_layers
    if args.layer is not None and not 1 <= args.layer < n_layers:
        pl.fail(f"--layer {args.layer} is out of range: this model has decoder layers 1..{n_layers - 1} to choose from")
    texts = pl.format_chat(tok, [p for k in train for p in train[k] + val[k]])
    pl.check_context(model, pl.token_lengths(tok, texts), extra_tokens=16)  # 16: the answers of refusal_tokens

    # 3. the candidate directions: the difference in means at every layer's input and position
    acts_harmful = pl.capture(model, tok, train["harmful"], args.positions, args.batch_size, "activations (harmful)")
    acts_harmless = pl.capture(model, tok, train["harmless"], args.positions, args.batch_size, "activations (harmless)")
    mean_diff = difference_in_means(acts_harmful, acts_harmless)  # [L, positions, d]
    r_hat_all = unit(mean_diff)
    candidates = [(l, p) for l in range(1, n_layers) for p in range(args.positions)]  # layer 0's input: embeddings

    # 4. silhouette of harmful vs harmless activations at every candidate (the fallback choice)
    labels = torch.cat([torch.ones(len(acts_harmful)), torch.zeros(len(acts_harmless))])
    sil = {(l, p): silhouette(torch.cat([acts_harmful[:, l, p], acts_harmless[:, l, p]]), labels)
           for l, p in tqdm(candidates, desc="silhouette", leave=False)}

    # 5. refusal tokens from the model's own refusals (or the fallback openers, saying so)
    tokens, n_refused = refusal_tokens(model, tok, val["harmful"], val["harmless"], args.batch_size)
    select_by, note = args.select, None
    if len(tokens) == 0 or n_refused < args.min_refusals:
        note = (f"the model refused {n_refused} of {len(val['harmful'])} held-out harmful prompts "
                f"(fewer than --min-refusals {args.min_refusals}); refusal tokens fall back to the openers "
                f"'I', 'Sorry', 'As', 'Unfortunately'")
        tokens = fallback_refusal_tokens(tok)
        if select_by == "refusal" and args.layer is None:
            note += "; layer selection falls back to silhouette"
            select_by = "silhouette"
        print("note: " + note, file=sys.stderr)
    base_harmful = pl.last_logits(model, tok, val["harmful"], args.batch_size, desc="baseline (harmful)")
    base_harmless = pl.last_logits(model, tok, val["harmless"], args.batch_size, desc="baseline (harmless)")

    def scores_of(l, p):
        return causal_scores(model, tok, mean_diff[l, p], r_hat_all[l, p], l, val, base_harmless, tokens,
                             args.batch_size)

    # 6. the layer: fixed, the paper's selection by bypass / induce / KL, or the best silhouette
    scores, chosen = {}, None
    if args.layer is not None:
        chosen, select_by = (args.layer, max(range(args.positions), key=lambda p: sil[(args.layer, p)])), "fixed"
    elif select_by == "refusal":
        scores = {c: scores_of(*c) for c in tqdm(candidates, desc="selecting layer")}
        chosen = select(candidates, scores, n_layers, args.prune_frac, args.max_kl)
        if chosen is None:
            note = (note + "; " if note else "") + "no candidate passed Arditi's filters; fell back to silhouette"
            print("note: no candidate passed the KL/induce/depth filters; falling back to silhouette", file=sys.stderr)
            select_by = "silhouette"
    if chosen is None:
        chosen = max(candidates, key=lambda c: sil[c])
    layer, pos = chosen

    # 7. the causal check of the chosen direction, next to the baseline
    at = scores.get(chosen) or scores_of(layer, pos)
    check = {"harmful_baseline": refusal_score(base_harmful, tokens).mean().item(), "harmful_ablated": at["bypass"],
             "harmless_baseline": refusal_score(base_harmless, tokens).mean().item(), "harmless_added": at["induce"],
             "kl_harmless_ablated": at["kl"]}

    # 8. outputs
    r_hat = r_hat_all[layer, pos].contiguous()
    if not torch.isfinite(mean_diff).all() or not torch.isfinite(r_hat).all():
        pl.fail("the difference in means is not finite (NaN or inf activations); nothing was written")
    position = pos - args.positions  # as an offset from the end of the prompt: -1 is the last token
    pl.save_torch(os.path.join(args.out, "direction.pt"), {
        "direction": r_hat, "layer": layer, "position": position, "mean_diff": mean_diff.contiguous(),
        "refusal_tokens": torch.tensor(tokens), "model": args.model, "n_layers": n_layers,
        "hidden_size": r_hat.shape[0]})
    per_layer = [{"layer": l, "position": p - args.positions, "silhouette": sil[(l, p)], **scores.get((l, p), {})}
                 for l, p in candidates]
    pl.save_json(os.path.join(args.out, "direction.json"), {
        "model": args.model, "layer": layer, "position": position, "select": select_by, "note": note,
        "n_prompts": {k: {"train": len(train[k]), "val": len(val[k])} for k in train},
        "refusal_tokens": {str(t): tok.decode([t]) for t in tokens}, "refused_val_harmful": n_refused,
        "causal_check": check, "per_layer": per_layer, "seed": args.seed, "seconds": round(time.time() - t0, 1),
        **pl.metadata(args, [args.harmful, args.harmless])})
    plot_layers(os.path.join(args.out, "layers.png"), per_layer, layer, args.model)
    print_summary(args, tok, tokens, layer, position, select_by, check)
    print(f"\nwrote {', '.join(os.path.join(args.out, o) for o in OUTPUTS)} in {time.time() - t0:.0f}s")


def print_summary(args, tok, tokens, layer, position, select_by, check):
    print(f"\nrefusal direction of {args.model}: layer {layer}, position {position} ({select_by}); "
          f"refusal tokens {[tok.decode([t]) for t in tokens]}")
    print("\ncausal check (mean refusal score on held-out prompts, log-odds):")
    print(f"  {'':10s} {'baseline':>9s} {'steered':>9s}")
    print(f"  {'harmful':10s} {check['harmful_baseline']:9.2f} {check['harmful_ablated']:9.2f}   direction ablated")
    print(f"  {'harmless':10s} {check['harmless_baseline']:9.2f} {check['harmless_added']:9.2f}   direction added")
    print(f"  KL on harmless under ablation: {check['kl_harmless_ablated']:.4f}")


def plot_layers(path, per_layer, layer, model_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = [r for r in per_layer if r["position"] == -1]
    xs = [r["layer"] for r in last]
    keys = [k for k in ("silhouette", "bypass", "induce", "kl") if k in last[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot(xs, [r[k] for r in last], marker=".")
        ax.axvline(layer, color="red", ls="--", lw=1)
        ax.set_xlabel("layer")
        ax.set_title({"silhouette": "silhouette (harmful vs harmless)", "bypass": "refusal score, harmful, ablated",
                      "induce": "refusal score, harmless, added", "kl": "KL on harmless, ablated"}[k], fontsize=9)
    fig.suptitle(f"{os.path.basename(model_name.rstrip('/'))}: chosen layer {layer}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    pl.run_main(main)
