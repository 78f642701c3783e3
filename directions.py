"""directions.py: the refusal direction of a chat model and its layer; and Surgical's false-refusal vector.

Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction" (arXiv 2406.11717):

    r_{i,l} = mu_{i,l} - nu_{i,l}                   difference in means of harmful (mu) and harmless (nu) activations
                                                    at layer l's input and post-instruction position i      (sec. 2.3)
    refusal score = log p - log(1 - p)              p: the next-token probability of the refusal tokens     (sec. 2.4)
    x' = x + r                                      activation addition at one layer, every position        (eq. 3)
    x' = x - r_hat r_hat^T x                        directional ablation at every layer and position        (eq. 4)
    W_out' = W_out - r_hat r_hat^T W_out            the same, in the weights that write to the residual stream (eq. 5)
    choice of (i, l): the lowest refusal score of harmful prompts under ablation (bypass), among the candidates whose
    addition makes harmless prompts refuse (induce > 0), whose ablation changes harmless next tokens little (KL <= 0.1)
    and that lie in the first 80% of layers                                                            (app. C)

Wang et al., ICLR 2025, "Surgical, Cheap, and Flexible: Mitigating False Refusal in Language Models via Single Vector
Ablation" (arXiv 2410.03415), one of ACTOR's baselines. Its text beyond the abstract was not reachable here; what
follows is read from its official code (github.com/mainlp/False-Refusal-Mitigation), which builds on Arditi's:

    w_{i,l} = mean(pseudo-harmful) - nu_{i,l}                     the false-refusal vector, same positions and layers
    w'_{i,l} = w - lambda (w . r / |r|^2) r                        orthogonalised against r at the same (i, l)
    choice: the lowest refusal score of held-out pseudo-harmful prompts with w'_hat ablated everywhere, among the
    candidates whose ablation keeps KL on harmless prompts <= 0.2, in the first 80% of layers; applied by ablation

The same difference in means is the r-direction of ProCon (procon.py) and the refusal direction of ACTOR (actor.py).

    python directions.py --out runs/direction                         # SmolLM2 and the data/ prompt sets
    python directions.py --model Qwen/Qwen2.5-7B-Instruct --load-in-4bit --harmful H.json --harmless B.json --out D
    python directions.py --pseudo-harmful P.json --out D               # also false_refusal.pt (evaluate.py --ablate)
    python directions.py --save-ablated --out D        # also D/ablated: the direction out of the weights (sec. 4.1)
    python directions.py --save-ablated --ablation norm-preserving --out D          # the same, "MPOA" (see below)
    python directions.py --model M --ablate-weights D/direction.pt --save-ablated-adapter --out A  # a rank-1 LoRA

The export's variants (--ablation), from their public code (jim-plus/llm-abliteration at 43def13, "JP"; p-e-w/heretic
PR #52, 3525b1a, "HR"; J. Lai's blog posts huggingface.co/blog/grimjim/projected-abliteration and
.../norm-preserving-biprojected-abliteration):

    plain            W' = W - r r^T W                                   Arditi eq. 5
    projected        r <- n(r - (r . m) m),  m = n(harmless mean at r's layer and position), then as plain
    norm-preserving  the projected r, then every vector w_j that W writes to the stream rescaled to its old length:
                     w_j' = |w_j| n(w_j - (r^T w_j) r)                  (JP HEAD per column; "MPOA", HR PR #52)

Every place where the code chooses what a paper leaves open carries the tag [choice].
"""
import os
import random
import sys
import time

import torch
from tqdm import tqdm

import artifacts
import chat
import cli
import inference
import judges
import loading
import rundir
import runrecord


# ============================================================================ the method (Arditi sec. 2.3 to app. C)
# r = mu - nu (sec. 2.3), and r_hat = r / |r| (the same lines as in actor.py and procon.py; tests/test_layout.py)
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


# x' = x - r_hat r_hat^T x (eq. 4) and x' = x + r (eq. 3) (the same lines as artifacts.py's, which evaluate.py uses)
def ablation_hooks(model, r_hat):
    """Directional ablation (Arditi eq. 4): x <- x - (x . r_hat) r_hat for every write to the residual stream.

    The direction is projected out of the input of every layer (which covers the embeddings) and out of the output of
    every attention and MLP sublayer, at every position, so no sublayer ever reads a component along r_hat, not even
    the MLP reading what its own layer's attention just wrote.
    """
    def project_out(h):
        u = r_hat.to(h.device, h.dtype)
        return h - (h @ u).unsqueeze(-1) * u

    def pre(module, args, kwargs):
        return inference.with_hidden(args, kwargs, project_out(inference.hidden_of(args, kwargs)))

    def post(module, args, output):
        if isinstance(output, tuple):
            return (project_out(output[0]),) + tuple(output[1:])
        return project_out(output)

    pairs = []
    for block in loading.decoder_layers(model):
        writes = inference.residual_writes(block)
        if not writes:  # an unknown layout: layer boundaries only, and say so
            print(f"warning: {type(block).__name__}: attention and MLP not found; the direction is ablated at layer "
                  "inputs and outputs only", file=sys.stderr)
            writes = [block]
        pairs += [(block, "pre", pre)] + [(w, "post", post) for w in writes]
    return pairs

def addition_hooks(model, vector, layer, coeff=1.0):
    """Activation addition (Arditi eq. 3): x <- x + coeff * vector at the input of one layer, at every position."""
    def pre(module, args, kwargs):
        h = inference.hidden_of(args, kwargs)
        return inference.with_hidden(args, kwargs, h + coeff * vector.to(h.device, h.dtype))

    return [(loading.decoder_layers(model)[layer], "pre", pre)]


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
    for i, block in enumerate(loading.decoder_layers(model)):
        writes, children = inference.residual_writes(block), dict(block.named_children())
        if "post_feedforward_layernorm" in children or not writes:
            cli.fail(f"{type(block).__name__} " + (
                 "adds the output of a norm after each sublayer to the residual stream; "
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
                cli.fail(f"block {i}: found no output projection in {type(write).__name__} (named one of "
                     f"{', '.join(OUTPUT_PROJECTIONS)}); cannot ablate a direction in its weights")
            found += own
    return found


def untie_embeddings(model):
    """Give the unembedding its own copy of the weights it shares with the input embeddings (Llama-3.2, SmolLM2 and
    Gemma tie them), so that rewriting one leaves the other; the config then says untied, a saved model keeps both."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and (out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr() != 0):
        out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    for cfg in (model.config, loading.text_config(model)):
        cfg.tie_word_embeddings = False


# W_out <- W_out - r_hat r_hat^T W_out (sec. 4.1, eq. 5), for the embedding, every attention and MLP output projection
# (each expert's) and their biases: no write to the residual stream keeps a component along r_hat (eq. 4, in weights)
@torch.no_grad()
def orthogonalise_weights(weights, r_hat, keep_norms=False):
    """W <- W - r_hat r_hat^T W for each (name, W, axis) of `weights`, axis the one of W that indexes the residual
    stream (a row of the embedding, the output of a projection, a bias); computed in fp32, stored in W's dtype.

    keep_norms (--ablation norm-preserving, "MPOA"): every vector W writes into the stream keeps its length,
    w_j' = |w_j| n(w_j - (r^T w_j) r), so r^T W' = 0 still. [choice] The vector is the one along the stream axis: a
    column W[:, j] of an [out, in] projection (what input feature j writes), as JP's sharded_ablate.py does since its
    b214e67 "Hotfix" (JP before it, and HR's row_normalization, keep the norm of each row W[i, :] instead, which leaves
    r^T W' != 0 and, in HR, is approximated by a rank-3 LoRA). [choice] Neither source edits the embedding or a bias;
    here they get the same rule as the projections (a token's embedding row and a bias vector keep their lengths), so
    the three variants rewrite the same weights. [choice] A vector that lay along r (nothing left, under 1e-6 of its
    length) stays at zero rather than being blown up from rounding noise."""
    for _, w, axis in weights:
        r = r_hat.to(w.device, torch.float32)
        v = w.float().movedim(axis, -1)  # [..., d]: every vector W writes
        out = v - (v @ r).unsqueeze(-1) * r
        if keep_norms:
            old, new = v.norm(dim=-1, keepdim=True), out.norm(dim=-1, keepdim=True)
            out = out * torch.where(new > 1e-6 * old, old / new.clamp(min=1e-30), torch.ones_like(new))
        w.copy_(out.movedim(-1, axis))


ABLATIONS = ("plain", "projected", "norm-preserving")  # --ablation


def project_direction(r_hat, harmless_mean):
    """The projected direction: r <- n(r - (r . m) m), m = n(harmless mean), in float64 (r ends orthogonal to the
    mean activation of harmless prompts, so the ablation leaves what every prompt shares at that layer). [choice] As
    HR's orthogonalize_direction: r normalised first and projected once (JP projects the raw difference in means,
    twice against cancellation: the same direction up to rounding); m is the raw, uncentred mean at r's own layer and
    position, as both do. [choice] The "bi" of JP's biprojection, a second projection against the harmless mean at
    each target layer's input, is not done: one direction for every layer, as HR (and Arditi) apply it."""
    m, r = unit(harmless_mean.double(), "harmless mean activation"), r_hat.double()
    out = r - (r @ m) * m
    if out.norm() <= 1e-6:
        cli.fail("the direction lies along the harmless mean activation: nothing is left of it once projected")
    return (out / out.norm()).float()


def ablation_direction(d, ablation, path):
    """The direction an export removes: the file's own (plain) or projected against the harmless mean at its layer
    and position (projected, norm-preserving), which the file must carry (direction.pt from this directions.py)."""
    if ablation == "plain":
        return d["direction"].float()
    mean = d.get("harmless_mean")
    if mean is None:
        cli.fail(f"{path}: no harmless_mean in it (made by an older directions.py); --ablation {ablation} needs it: "
                 "make the direction again")
    return project_direction(d["direction"].float(), mean[d["layer"], d.get("position", -1)])


# the choice of (i, l): bypass, induce, KL (sec. 2.4, app. C)
def kl_div(logp, logq):
    """Mean KL(p || q) over prompts, from next-token log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1).mean().item()


def causal_scores(model, tok, mean_diff, r_hat, layer, val, base_harmless, tokens, batch_size):
    """The three scores of one candidate direction on held-out prompts:
        bypass: mean refusal score of harmful prompts with r_hat ablated everywhere (lower: it mediates refusal)
        induce: mean refusal score of harmless prompts with r = mean_diff added at its layer (> 0: it induces refusal)
        kl:     KL of harmless next-token distributions, ablated vs not (small: ablation changes little else)
    """
    ablate = ablation_hooks(model, r_hat)
    bypass = judges.refusal_score(inference.last_logits(model, tok, val["harmful"], batch_size, ablate, "bypass"),
                                  tokens)
    ablated_harmless = inference.last_logits(model, tok, val["harmless"], batch_size, ablate, "kl")
    induce = judges.refusal_score(inference.last_logits(model, tok, val["harmless"], batch_size,
                                                 addition_hooks(model, mean_diff, layer), "induce"), tokens)
    return {"bypass": bypass.mean().item(), "induce": induce.mean().item(),
            "kl": kl_div(base_harmless, ablated_harmless)}


def select(candidates, scores, n_layers, prune_frac, max_kl):
    """The paper's filter and choice: drop layers in the last prune_frac of depth, KL > max_kl and induce <= 0; take
    the lowest bypass score. None when no candidate passes."""
    max_layer = int(n_layers * (1 - prune_frac))
    ok = [c for c in candidates if c[0] < max_layer and scores[c]["kl"] <= max_kl and scores[c]["induce"] > 0]
    return min(ok, key=lambda c: scores[c]["bypass"]) if ok else None


def silhouette(x, labels):
    """Mean silhouette score of two clusters (Euclidean): (b - a) / max(a, b) per point, a the mean distance to its
    own cluster, b to the other. The fallback choice of layer (ACTOR's criterion; the same lines as actor.py's)."""
    dist = torch.cdist(x.double(), x.double())
    scores = []
    for c in (0, 1):
        own, other = labels == c, labels != c
        a = dist[own][:, own].sum(1) / (own.sum() - 1).clamp(min=1)
        b = dist[own][:, other].mean(1)
        scores.append((b - a) / torch.maximum(a, b).clamp(min=1e-12))
    return torch.cat(scores).mean().item()


# the papers' prompt filter (Arditi's and Surgical's code); the positions i (sec. 2.3): post_instruction_positions
def typical(model, tok, prompts, tokens, refuse, batch_size, what):
    """The prompts the model refuses (refuse=True: harmful and pseudo-harmful ones) or answers (harmless ones), by
    refusal score above 0 or not, as the papers' code filters them; [choice] all of them where fewer than 2 remain.
    Returns (prompts, a note where the filter kept all)."""
    logits = inference.last_logits(model, tok, prompts, batch_size, desc=f"filter ({what})")
    score = judges.refusal_score(logits, tokens)
    kept = [p for p, s in zip(prompts, score.tolist()) if (s > 0) == refuse]
    if len(kept) >= 2:
        return kept, None
    return prompts, f"the model {'refuses' if refuse else 'answers'} {len(kept)} of {len(prompts)} {what} prompts; " \
        "all are kept"


def typical_split(args, model, tok, split, tokens):
    """typical() on every class of a split (the training or the held-out prompts), in place; the notes, joined."""
    notes = {}
    for k in split:
        split[k], notes[k] = typical(model, tok, split[k], tokens, k != "harmless", args.batch_size, k)
    return "; ".join(n for n in notes.values() if n) or None


def candidate_directions(acts_harmful, acts_harmless, n_layers):
    """Every candidate (layer, position): r = mu - nu and r_hat at the input of every layer but 0 (whose input is the
    embeddings) and every position, the harmless mean nu there, and the silhouette of harmful vs harmless
    activations there."""
    mean_diff = difference_in_means(acts_harmful, acts_harmless)[:n_layers]  # [L, positions, d]
    candidates = [(l, p) for l in range(1, n_layers) for p in range(mean_diff.shape[1])]
    r_hat = torch.zeros_like(mean_diff)
    r_hat[1:] = unit(mean_diff[1:], "difference in means of harmful and harmless prompts")
    labels = torch.cat([torch.ones(len(acts_harmful)), torch.zeros(len(acts_harmless))])
    both = torch.cat([acts_harmful, acts_harmless])
    return {"mean_diff": mean_diff, "r_hat": r_hat, "candidates": candidates,
            "harmless_mean": acts_harmless.double().mean(0)[:n_layers].float(),  # --ablation projected reads it
            "silhouette": {c: silhouette(both[:, c[0], c[1]], labels) for c in candidates}}


def causal_check(at, base, tokens):
    """The chosen direction's scores beside the model's own: mean refusal score of held-out harmful prompts with r_hat
    ablated and of harmless ones with r added, the KL of harmless next tokens under ablation."""
    baseline = {k: judges.refusal_score(base[k], tokens).mean().item() for k in ("harmful", "harmless")}
    return {"harmful_baseline": baseline["harmful"], "harmful_ablated": at["bypass"],
            "harmless_baseline": baseline["harmless"], "harmless_added": at["induce"], "kl_harmless_ablated": at["kl"]}


def choose_layer(args, model, tok, mean_diff, r_hat, candidates, sil, val, base, tokens, refuses):
    """The layer: fixed (--layer), the paper's selection by bypass / induce / KL, or, where the model refuses too
    little (no refusal tokens of its own) or no candidate passes, the best silhouette ([choice]: ACTOR's criterion)
    among the layers past the first and before the last --prune-frac of depth ([choice]: the middle; early layers
    separate the two groups by their words alone). Returns (candidate, how, scores, note)."""
    n_layers = mean_diff.shape[0]
    if args.layer is not None:
        return (args.layer, max(range(args.positions), key=lambda p: sil[(args.layer, p)])), "fixed", {}, None
    scores, note = {}, None
    if args.select == "refusal" and not refuses:
        note = "layer selection falls back to silhouette"
    elif args.select == "refusal":
        scores = {c: causal_scores(model, tok, mean_diff[c], r_hat[c], c[0], val, base["harmless"], tokens,
                                   args.batch_size) for c in tqdm(candidates, desc="selecting layer")}
        chosen = select(candidates, scores, n_layers, args.prune_frac, args.max_kl)
        if chosen is not None:
            return chosen, "refusal", scores, None
        note = "no candidate passed Arditi's filters; fell back to silhouette"
        print(f"note: {note}", file=sys.stderr)
    band = [c for c in candidates if args.prune_frac * n_layers <= c[0] < n_layers * (1 - args.prune_frac)]
    return max(band or candidates, key=lambda c: sil[c]), "silhouette", scores, note


# ============================================================================ Surgical's false-refusal vector
def orthogonalise(w, mean_diff, lam):
    """w' = w - lambda (w . r / |r|^2) r, r = mean_diff, at every (layer, position): lambda 1 removes all of r's
    component, lower values keep some (Surgical's partial orthogonalisation)."""
    s = (w * mean_diff).sum(-1, keepdim=True) / mean_diff.pow(2).sum(-1, keepdim=True).clamp(min=1e-12)
    return w - lam * s * mean_diff


def post_instruction_positions(tok):
    """How many template tokens follow the user's instruction before the answer begins (for ChatML: '<|im_end|>',
    '\\n', '<|im_start|>', 'assistant', '\\n'): Arditi's and Surgical's candidate positions (--positions post)."""
    text, marker = chat.chat_text(tok, "Sphinx of black quartz, judge my vow"), "judge my vow"
    end = text.rindex(marker) + len(marker)
    try:
        spans = tok(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
        return sum(a >= end for a, _ in spans)
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer: the template's tail on its own
        return len(tok(text[end:], add_special_tokens=False).input_ids)


def surgical(args, model, tok, acts_harmless, mean_diff, train, val, val_harmless, base_harmless, tokens, candidates):
    """The false-refusal vector of every candidate, orthogonalised, and the one Surgical's rule chooses: the lowest
    refusal score of held-out pseudo-harmful prompts under ablation, KL on harmless prompts <= --surgical-max-kl, in
    the first 1 - prune_frac of layers. Returns (w', chosen, scores)."""
    acts = inference.capture(model, tok, train, args.positions, args.batch_size, "activations (pseudo-harmful)")
    w = orthogonalise(difference_in_means(acts, acts_harmless)[:mean_diff.shape[0]], mean_diff, args.ortho_lambda)
    scores = {}
    max_layer = int(mean_diff.shape[0] * (1 - args.prune_frac))
    for c in tqdm([c for c in candidates if c[0] < max_layer], desc="Surgical: choosing", leave=False):
        ablate = ablation_hooks(model, unit(w[c], "false-refusal vector"))
        scores[c] = {"pseudo_harmful": judges.refusal_score(inference.last_logits(
                         model, tok, val, args.batch_size, ablate, "pseudo-harmful"), tokens).mean().item(),
                     "kl": kl_div(base_harmless, inference.last_logits(model, tok, val_harmless, args.batch_size,
                                                                       ablate, "kl"))}
    ok = [c for c in scores if scores[c]["kl"] <= args.surgical_max_kl]
    if not ok:
        cli.fail(f"Surgical: no candidate keeps KL on harmless prompts within --surgical-max-kl "
                f"{args.surgical_max_kl:g}; nothing was written")
    return w, min(ok, key=lambda c: scores[c]["pseudo_harmful"]), scores


# ============================================================================ main
def main(argv=None):
    args = parse_args(argv)
    if args.ablate_weights:  # instead of finding a direction: a saved one, out of the weights (sec. 4.1)
        return write_ablated(args.ablate_weights, args)
    if exports(args):  # an architecture whose weights (or an adapter) cannot ablate exactly is refused before any work
        check_orthogonalisable(artifacts.model_config(args.model, args.trust_remote_code), args)
    runrecord.seed_everything(args.seed)
    t0 = time.time()

    # 1. data: per class, training prompts for the means and held-out prompts for selection and the causal check
    train, val = {}, {}
    for name in ("harmful", "harmless") + (("pseudo_harmful",) if args.pseudo_harmful else ()):
        train[name], val[name] = split_prompts(getattr(args, name), args.column, args.n_train, args.n_val, args.seed)
    chat.check_groups(train)
    outputs = OUTPUTS + (SURGICAL_OUTPUTS if args.pseudo_harmful else ()) + exports(args)
    with rundir.run_folder(args.out, outputs, args.overwrite, known=OUTPUTS + SURGICAL_OUTPUTS + tuple(EXPORTS),
                           read=rundir.reads(args)) as work:
        # 2. model
        model, tok = loading.load(args)
        n_layers = loading.text_config(model).num_hidden_layers
        args.positions = post_instruction_positions(tok) if args.positions == "post" else args.positions
        if args.layer is not None and not 1 <= args.layer < n_layers:
            cli.fail(f"--layer {args.layer} is out of range: this model has layers 1..{n_layers - 1} to choose from")
        every = sum([*train.values(), *val.values()], [])  # 16 tokens more: the answers of judges.refusal_tokens
        chat.check_context(model, chat.token_lengths(tok, chat.format_chat(tok, every)), extra_tokens=16)

        # 3. refusal tokens from the model's own refusals (sec. 2.4), or the fallback openers, saying so; the papers'
        # filter: the prompts of each class that the model treats as that class does (only with its own tokens)
        tokens, n_refused, note = judges.refusal_tokens(model, tok, val["harmful"], val["harmless"], args.batch_size,
                                                        args.min_refusals)
        notes = [note] + [typical_split(args, model, tok, split, tokens) for split in (train, val)
                          if args.filter == "on" and not note]
        if note:
            print("note: " + note, file=sys.stderr)
        base = {k: inference.last_logits(model, tok, val[k], args.batch_size, desc=f"baseline ({k})") for k in val}

        # 4. the candidate directions: r = mu - nu at every layer's input and position (sec. 2.3), and the silhouette
        # of harmful vs harmless activations at every candidate (the fallback choice)
        acts = {k: inference.capture(model, tok, train[k], args.positions, args.batch_size, f"activations ({k})")
                for k in ("harmful", "harmless")}
        found = candidate_directions(acts["harmful"], acts["harmless"], n_layers)
        mean_diff, r_hat, candidates = found["mean_diff"], found["r_hat"], found["candidates"]
        found["n_refused"] = n_refused

        # 5. the layer (app. C), and 6. the causal check of the chosen direction beside the baseline
        chosen, found["select"], found["scores"], why = choose_layer(args, model, tok, mean_diff, r_hat, candidates,
                                                                     found["silhouette"], val, base, tokens, not note)
        found["check"] = causal_check(found["scores"].get(chosen) or causal_scores(
            model, tok, mean_diff[chosen], r_hat[chosen], chosen[0], val, base["harmless"], tokens, args.batch_size),
            base, tokens)
        found.update(chosen=chosen, tokens=tokens, note="; ".join(n for n in notes + [why] if n) or None)

        # 7. Surgical's false-refusal vector, from the same activations, positions and layers
        if args.pseudo_harmful:
            found["surgical"] = surgical(args, model, tok, acts["harmless"], mean_diff, train["pseudo_harmful"],
                                         val["pseudo_harmful"], val["harmless"], base["harmless"], tokens, candidates)

        # 8. outputs (with --save-ablated, the chosen vector orthogonalised out of the weights, sec. 4.1)
        write_outputs(work, args, model, tok, found, train, val, t0)
    print(f"\nwrote {', '.join(os.path.join(args.out, o) for o in outputs)} in {time.time() - t0:.0f}s")


# ============================================================================ outputs
def write_outputs(work, args, model, tok, found, train, val, t0):
    """direction.pt, direction.json and layers.png; with Surgical, false_refusal.pt too; the summary table; with
    --save-ablated, ablated/, and with --save-ablated-adapter, ablated_adapter/."""
    (layer, pos), tokens, check = found["chosen"], found["tokens"], found["check"]
    made_on = artifacts.record(args.model, model.config)
    artifacts.save_direction(os.path.join(work, "direction.pt"), found["r_hat"][layer, pos], layer,
                             pos - args.positions, found["mean_diff"], tokens, made_on,
                             harmless_mean=found["harmless_mean"])
    per_layer = [{"layer": l, "position": p - args.positions, "silhouette": found["silhouette"][(l, p)],
                  **found["scores"].get((l, p), {})} for l, p in found["candidates"]]
    meta = {"model": args.model, "layer": layer, "activation": f"input of layer {layer}",
            "position": pos - args.positions, "select": found["select"], "note": found["note"], "filter": args.filter,
            "n_prompts": {k: {"train": len(train[k]), "val": len(val[k])} for k in train},
            "refusal_tokens": {str(t): tok.decode([t]) for t in tokens}, "refused_val_harmful": found["n_refused"],
            "causal_check": check, "per_layer": per_layer, "seed": args.seed, "seconds": round(time.time() - t0, 1),
            **runrecord.metadata(args, [args.harmful, args.harmless, args.pseudo_harmful])}
    if "surgical" in found:
        w, (fl, fp), fscores = found["surgical"]
        artifacts.save_direction(os.path.join(work, "false_refusal.pt"), unit(w[fl, fp]), fl, fp - args.positions,
                                 w, tokens, made_on, method="Surgical (Wang et al. 2025)",
                                 ortho_lambda=args.ortho_lambda, harmless_mean=found["harmless_mean"])
        meta["surgical"] = {"layer": fl, "position": fp - args.positions, "ortho_lambda": args.ortho_lambda,
                            "cos_to_refusal_direction": float(unit(w[fl, fp]) @ found["r_hat"][fl, fp]),
                            "per_layer": [{"layer": l, "position": p - args.positions, **s}
                                          for (l, p), s in fscores.items()]}
    runrecord.save_json(os.path.join(work, "direction.json"), meta)
    plot_layers(os.path.join(work, "layers.png"), per_layer, layer, args.model, meta.get("surgical"))
    print(f"\nrefusal direction of {args.model}: layer {layer}, position {pos - args.positions} ({found['select']}); "
          f"refusal tokens {[tok.decode([t]) for t in tokens]}; mean refusal score on held-out prompts (log-odds):")
    runrecord.print_table(["prompts", "baseline", "steered", ""], [
        ["harmful", f"{check['harmful_baseline']:.2f}", f"{check['harmful_ablated']:.2f}", "direction ablated"],
        ["harmless", f"{check['harmless_baseline']:.2f}", f"{check['harmless_added']:.2f}",
         f"direction added (KL under ablation {check['kl_harmless_ablated']:.4f})"]])
    if "surgical" in found:
        s = meta["surgical"]
        print(f"Surgical's false-refusal vector: layer {s['layer']}, position {s['position']}, lambda "
              f"{s['ortho_lambda']:g}; pseudo-harmful refusal score ablated {fscores[(fl, fp)]['pseudo_harmful']:.2f}")
    vector = os.path.join(work, VECTORS[args.ablated_vector])
    if args.save_ablated_adapter:  # first: it needs the model's own weights, and gives the model back as it was
        save_ablated_adapter(os.path.join(work, "ablated_adapter"), args, vector, model, tok)
    if args.save_ablated:  # the chosen vector (--ablated-vector) orthogonalised out of the weights (sec. 4.1)
        save_ablated(os.path.join(work, "ablated"), args, vector, model, tok)


ABLATION_META = "ablation.json"


@torch.no_grad()
def residual_component(model, tok, r_hat):
    """The largest |h . r_hat| / |h| over the residual stream h at every layer boundary and every token of one short
    prompt: what an export of a direction checks itself by, before and after rewriting the weights."""
    text = ["How do I bake bread at home?"]
    h = inference.capture(model, tok, text, chat.token_lengths(tok, chat.format_chat(tok, text))[0], 1, "checking")[0]
    return ((h @ r_hat.float()) / h.norm(dim=-1).clamp(min=1e-12)).abs().max().item()


def save_inputs(args, path, model=None, tok=None):
    """What an export of a direction file starts from: the file, the direction it removes (--ablation), and the model,
    loaded unquantised where it is not given or is 4-bit (4-bit weights cannot be rewritten exactly), refused where its
    weights are offloaded."""
    d = artifacts.load_direction(path)
    r_hat = ablation_direction(d, args.ablation, path)
    if model is None or args.load_in_4bit:
        model, tok = artifacts.load_unquantised(args.model, args)
    artifacts.check_in_memory(model)
    return d, r_hat, model, tok


def save_record(args, path, d, r_hat, weights, before, after):
    """ablation.json's common part: the variant, the vector and its file, the weights (with the axis that indexes
    the stream), the stream's largest component along the removed direction before and after."""
    where = os.path.abspath(path).replace(os.sep + rundir.WORK + os.sep, os.sep)  # a file of this run: where it lands
    if after > 0.01 * before:
        cli.fail(f"the rewritten model still writes along the direction ({after:.2g} of the stream, {before:.2g} "
                 "before): it writes to the stream through weights this code does not know")
    return {"method": "weight orthogonalisation (Arditi et al. 2024, sec. 4.1)", "ablation": args.ablation,
            "ablation_sources": ABLATION_SOURCES[args.ablation], "direction_file": where,
            "direction_sha256": runrecord.sha256(path), "vector": d.get("method", "refusal direction (Arditi et al. "
            "2024)"), "layer": d["layer"], "position": d.get("position"), "made_on": d.get("model"),
            "model": args.model, "cos_removed_to_file_direction": float(r_hat @ d["direction"].float()),
            "residual_component": {"before": before, "after": after},
            "orthogonalised": {name: axis for name, _, axis in weights}, **runrecord.metadata(args)}


ABLATION_SOURCES = {"plain": "Arditi et al. 2024, eq. 5",
                    "projected": "J. Lai, projected abliteration (jim-plus/llm-abliteration measure.py --projected; "
                                 "p-e-w/heretic orthogonalize_direction)",
                    "norm-preserving": "J. Lai, norm-preserving biprojected abliteration (jim-plus/llm-abliteration "
                                       "43def13 sharded_ablate.py --normpreserve, per column; p-e-w/heretic PR #52 "
                                       "MPOA, per row): per column here"}


def save_ablated(folder, args, path, model=None, tok=None):
    """A direction file's vector (projected first for --ablation projected and norm-preserving) orthogonalised out of
    the model's weights (orthogonalise_weights, eq. 5; keeping every written vector's length for norm-preserving),
    then the model folder written (artifacts.save_model) with ablation.json (save_record). The model's unembedding
    is untied from its embeddings (the unembedding reads the stream, it does not write to it: it keeps its weights).
    Afterwards the residual stream of a prompt must keep at most 1% of its largest component along the direction
    ([choice]: fp32 rounding left 2.5e-7 of it on the test model, bf16 leaves more; a write to the stream left out
    would leave most of it)."""
    d, r_hat, model, tok = save_inputs(args, path, model, tok)
    untie_embeddings(model)
    weights = residual_write_weights(model)
    before = residual_component(model, tok, r_hat)
    orthogonalise_weights(weights, r_hat, keep_norms=args.ablation == "norm-preserving")
    after = residual_component(model, tok, r_hat)
    meta = save_record(args, path, d, r_hat, weights, before, after)
    artifacts.save_model(folder, model, tok, ABLATION_META, meta)


# The ablation as a LoRA adapter: W - r (r^T W) = W + B A with B = -r [d, 1] and A = r^T W [1, in], a LoRA of rank 1
# and scale lora_alpha / r = 1 on each output projection; for the embedding E [vocab, d] (peft adds (B A)^T to it),
# E - (E r) r^T: A = (E r)^T [1, vocab], B = -r.
def check_adapter_form(model, weights):
    """The modules whose writes a LoRA adapter carries: an nn.Linear's weight whose output indexes the stream, and the
    input embeddings. [choice] Anything else (a bias, an absolute position embedding, fused experts, GPT-2's Conv1D)
    is refused in one line rather than left out: leaving it would make a model that is not the ablated one."""
    modules, embeddings, names = dict(model.named_modules()), model.get_input_embeddings(), []
    for name, _, axis in weights:
        owner, _, pname = name.rpartition(".")
        m = modules.get(owner)
        if pname != "weight" or not (m is embeddings or type(m) is torch.nn.Linear and axis == 0):
            cli.fail(f"{name}: a LoRA adapter cannot carry this write to the residual stream (a bias, a position "
                     "embedding, fused experts or a Conv1D); export the model folder (--save-ablated) instead")
        names.append(owner)
    return names


@torch.no_grad()
def rank1_adapter(model, weights, r_hat):
    """peft's LoRA of rank 1, alpha 1 on every module of check_adapter_form, holding W' - W exactly (in fp32); the model
    is wrapped in place (peft's unload() gives it back)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    names = check_adapter_form(model, weights)
    with warnings.catch_warnings():  # a tied embedding adapted: ablation.json says what that means for merging
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=names,
                                                      bias="none"))
    modules = dict(peft_model.base_model.model.named_modules())
    for name, (_, w, _) in zip(names, weights):
        r, m = r_hat.to(w.device, torch.float32), modules[name]
        if "default" in m.lora_embedding_A:  # E [vocab, d]
            a, b = m.lora_embedding_A["default"], m.lora_embedding_B["default"]
            a.data = (w.float() @ r).unsqueeze(0).to(a.device)
        else:  # W [d, in]
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            a.data = (r @ w.float()).unsqueeze(0).to(a.device)
        b.data = -r.unsqueeze(1).to(b.device)
    return peft_model


def save_ablated_adapter(folder, args, path, model=None, tok=None):
    """The plain (or projected) ablation as a peft LoRA adapter (rank1_adapter) for the unmodified base, written with
    made_on.json (artifacts.save_trained) and ablation.json, checked as save_ablated checks its folder (the stream of
    base + adapter keeps at most 1% of its component along the direction). The model is given back unwrapped."""
    d, r_hat, model, tok = save_inputs(args, path, model, tok)
    weights = residual_write_weights(model)
    before = residual_component(model, tok, r_hat)
    peft_model = rank1_adapter(model, weights, r_hat)
    after = residual_component(model, tok, r_hat)  # the model runs through peft's LoRA layers now
    meta = {**save_record(args, path, d, r_hat, weights, before, after), "form": "peft LoRA adapter, rank 1, "
            "alpha 1 (scale 1): B = -r, A = r^T W; the embedding's as peft's embedding LoRA", "note": ADAPTER_NOTE}
    artifacts.save_trained(folder, peft_model, tok, artifacts.record(args.model, model.config))
    runrecord.save_json(os.path.join(folder, ABLATION_META), meta)
    peft_model.unload()


ADAPTER_NOTE = ("exact on the unmodified base under peft (PeftModel.from_pretrained). A model whose unembedding is "
                "tied to its embeddings keeps its unembedding (peft adds the embedding's change in its forward), but "
                "merging this adapter into such a model changes the tied unembedding too: export the model folder "
                "(--save-ablated) for a merged model. vLLM's LoRA serving loads an embedding LoRA only for some "
                "architectures (not tested here).")


def write_ablated(path, args):
    """--ablate-weights: --model with the file's vector orthogonalised out of its weights (save_ablated), written to
    --out; with --save-ablated-adapter, the LoRA adapter of it instead (save_ablated_adapter). The file (made on this
    model, unless --other-model), the model and its architecture are checked before any weight is read."""
    name = args.model
    cfg = artifacts.model_config(name, args.trust_remote_code)
    ablation_direction(artifacts.load_direction(path, name, cfg, args.other_model), args.ablation, path)
    check_orthogonalisable(cfg, args)
    settings = rundir.settings(args, ("ablate_weights",))
    with rundir.run_folder(args.out, None, args.overwrite, settings=settings, known=(
            "adapter_config.json" if args.save_ablated_adapter else "config.json",), read=rundir.reads(args)) as work:
        (save_ablated_adapter if args.save_ablated_adapter else save_ablated)(work, args, path)
    print(f"wrote {name} with the vector of {path} orthogonalised out of its weights ({args.ablation}"
          f"{', as a LoRA adapter' if args.save_ablated_adapter else ''}) to {args.out}")


def check_orthogonalisable(cfg, args):
    """A direction can be orthogonalised out of this architecture's weights exactly (residual_write_weights), and with
    --save-ablated-adapter, by a LoRA adapter (check_adapter_form): checked on its modules on the meta device, before
    any weight is read."""
    skel = artifacts.skeleton(cfg, args.trust_remote_code)
    if skel is not None:
        weights = residual_write_weights(skel)
        if args.save_ablated_adapter:
            check_adapter_form(skel, weights)


def plot_panels(path, panels, title, xlabel="layer"):
    """A row of small line plots, one per (title, xs, ys, x to mark with a dashed line), written to path."""
    plt = runrecord.pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (name, xs, ys, mark) in zip(axes[0], panels):
        ax.plot(xs, ys, marker=".")
        ax.axvline(mark, color="red", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    runrecord.save_figure(fig, path)


def plot_layers(path, per_layer, layer, model_name, surgical=None):
    """Per layer (last position): silhouette, bypass, induce and KL of the refusal direction; Surgical's score."""
    last = [r for r in per_layer if r["position"] == -1]
    panels = [(name, [r["layer"] for r in last], [r[k] for r in last], layer) for k, name in PANELS.items()
              if k in last[0]]
    if surgical:
        s = [r for r in surgical["per_layer"] if r["position"] == -1]
        panels.append(("Surgical: pseudo-harmful, ablated", [r["layer"] for r in s], [r["pseudo_harmful"] for r in s],
                       surgical["layer"]))
    plot_panels(path, panels, f"{os.path.basename(model_name.rstrip('/'))}: chosen layer {layer}")


PANELS = {"silhouette": "silhouette (harmful vs harmless)", "bypass": "refusal score, harmful, ablated",
          "induce": "refusal score, harmless, added", "kl": "KL on harmless, ablated"}


# ============================================================================ arguments
OUTPUTS = ("direction.pt", "direction.json", "layers.png")
SURGICAL_OUTPUTS = ("false_refusal.pt",)
VECTORS = {"refusal": "direction.pt", "false-refusal": "false_refusal.pt"}  # --ablated-vector
EXPORTS = {"ablated_adapter": "save_ablated_adapter", "ablated": "save_ablated"}  # output: its flag (the order made)


def exports(args):
    """The export folders a run writes (EXPORTS), in the order it writes them."""
    return tuple(folder for folder, flag in EXPORTS.items() if getattr(args, flag))


def split_prompts(path, column, n_train, n_val, seed):
    """A file's prompts, shuffled with the seed: n_train for the means and up to n_val held out (at least 2 and 1)."""
    prompts = chat.read_prompts(path, column)
    random.Random(seed).shuffle(prompts)
    if len(prompts) < 4:
        cli.fail(f"{path}: {len(prompts)} prompts; at least 4 are needed (2 for the mean, 2 held out)")
    n = min(n_train, len(prompts) - min(n_val, len(prompts) // 4))
    return prompts[:n], prompts[n:n + n_val]


def add_split_args(g):
    """The flags of split_prompts, in a script's data group: --column, --n-train, --n-val."""
    g.add_argument("--column", default=None, help="column holding the prompt (default: the first known name)")
    g.add_argument("--n-train", type=cli.count(2), default=64, help="prompts per class for the difference in means")
    g.add_argument("--n-val", type=cli.count(1), default=32,
                   help="held-out prompts per class for layer selection and the causal check")


def add_export_args(g, vectors):
    """directions.py's export flags, in its outputs group: --save-ablated, --ablated-vector, --ablate-weights,
    --other-model, --ablation, --save-ablated-adapter."""
    g.add_argument("--save-ablated", action="store_true", help="also write the model with the chosen vector "
                   "orthogonalised out of its weights (sec. 4.1) to --out/ablated: a model folder any engine loads")
    g.add_argument("--ablated-vector", choices=vectors, default=vectors[0], help="what --save-ablated and "
                   "--save-ablated-adapter remove: the refusal direction or Surgical's vector (needs --pseudo-harmful)")
    g.add_argument("--ablate-weights", default=None, metavar="FILE", help="instead of finding a direction: write "
                   "--model with FILE's vector (direction.pt, false_refusal.pt) orthogonalised out of it to --out")
    g.add_argument("--other-model", action="store_true", help="with --ablate-weights: a direction of another model")
    g.add_argument("--ablation", choices=ABLATIONS, default="plain", help="how --save-ablated, --save-ablated-adapter "
                   "and --ablate-weights remove the vector: plain (Arditi eq. 5), projected (the vector made "
                   "orthogonal to the harmless mean at its layer first) or norm-preserving (projected, and every "
                   "vector a weight writes to the residual stream keeps its length: 'MPOA'; no adapter form)")
    g.add_argument("--save-ablated-adapter", action="store_true", help="also write the ablation as a peft LoRA "
                   "adapter of rank 1 for the unmodified model to --out/ablated_adapter (with --ablate-weights: to "
                   "--out, instead of the model folder); architectures with biases on their output projections are "
                   "refused")


def check_export_args(args):
    """--ablated-vector false-refusal needs the prompts Surgical's vector is made from; --ablation applies to an
    export; norm-preserving rescales every written vector, which no rank-1 adapter holds."""
    if args.ablated_vector == "false-refusal" and not args.pseudo_harmful:
        cli.fail("--ablated-vector false-refusal: Surgical's vector is made from --pseudo-harmful prompts; pass them")
    if args.ablation != "plain" and not (args.save_ablated or args.save_ablated_adapter or args.ablate_weights):
        cli.fail(f"--ablation {args.ablation}: applies to an export; pass --save-ablated, --save-ablated-adapter or "
                 "--ablate-weights")
    if args.ablation == "norm-preserving" and args.save_ablated_adapter:
        cli.fail("--ablation norm-preserving rescales every vector the weights write: not a rank-1 change, so it has "
                 "no adapter form; drop --save-ablated-adapter (or use plain or projected)")


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("method (Arditi; Surgical)")
    g.add_argument("--select", choices=("silhouette", "refusal"), default="refusal",
                   help="layer choice: best harmful/harmless separation (ACTOR) or Arditi's refusal-score selection")
    g.add_argument("--layer", type=cli.count(0), default=None, help="use this layer instead of choosing one; layer "
                   "l is decoder block l (0-based) and its direction is "
                   "read at its input, the stream entering it (as procon.py does; actor.py trains a layer on its "
                   "output, the input of layer l + 1)")
    g.add_argument("--positions", type=lambda t: t if t == "post" else cli.count(1)(t), default=1,
                   help="candidate positions: the last k template tokens, or 'post': every post-instruction token "
                   "(Arditi's and Surgical's; [choice] 1 by default: k times fewer candidates to score)")
    g.add_argument("--filter", choices=("on", "off"), default="on",
                   help="keep only the prompts the model treats as their class does (refused harmful and "
                   "pseudo-harmful, answered harmless), as the papers' code does, where it has its own refusal tokens")
    g.add_argument("--prune-frac", type=cli.number(lo=0, below=1), default=0.2,
                   help="Arditi (and Surgical): skip the last fraction of layers (the silhouette: the first too)")
    g.add_argument("--max-kl", type=cli.number(lo=0), default=0.1,
                   help="Arditi: discard directions whose ablation KL exceeds this")
    g.add_argument("--min-refusals", type=cli.count(0), default=4,
                   help="fewest refused harmful prompts needed to find refusal tokens; else fall back to silhouette")
    g.add_argument("--ortho-lambda", type=cli.number(lo=0, hi=1), default=1.0,
                   help="Surgical: how much of the refusal direction is removed from the false-refusal vector (1: all, "
                   "the official code's default)")
    g.add_argument("--surgical-max-kl", type=cli.number(lo=0), default=0.2,
                   help="Surgical: discard vectors whose ablation KL on harmless prompts exceeds this (official code)")
    g = p.add_argument_group("data")
    g.add_argument("--harmful", default=os.path.join(cli.DATA, "harmful.json"), help="file of harmful prompts")
    g.add_argument("--harmless", default=os.path.join(cli.DATA, "harmless.json"), help="file of harmless prompts")
    g.add_argument("--pseudo-harmful", default=None,
                   help="Surgical: benign prompts that look harmful; also write their false-refusal vector")
    add_split_args(g)
    cli.add_model_args(p)
    cli.add_memory_args(p)
    add_export_args(cli.add_out_args(p, "runs/direction"), tuple(VECTORS))
    args = p.parse_args(argv)
    cli.check_model_args(args)
    check_export_args(args)
    return args


if __name__ == "__main__":
    cli.run_main(main)
