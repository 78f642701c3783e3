"""procon.py: instruction fine-tuning with ProCon's projection constraint on the refusal direction.

Du et al. 2025, "Anchoring Refusal Direction: Mitigating Safety Risks in Tuning via Projection Constraint" (arXiv
2509.06795). Benign instruction fine-tuning (IFT) drifts the refusal direction (the r-direction) and erodes refusals;
ProCon adds "a projection-constrained loss term that regularizes the projection magnitude of each training sample's
hidden state onto the r-direction", then "a warm-up strategy that emphasizes early-stage strong constraints" and
safety data that "broaden the data distribution" (ProCon_wu_safe). Only the abstract is reachable here: the form below
is this project's reading of it, and every number in it is a [choice] (results/procon.md measures them).

    r_hat_l = normalise(mu_l - nu_l)             the initial model's r-direction at the input of layer l, at the
                                                 prompt's last token (difference in means of harmful and harmless)
    z_{l,j} = r_hat_l . x_{l,j}                  the projection of a sample's hidden state at layer l and token j
    z0_{l,j}                                     the same under the initial weights, recorded once before training
    C = sum_l sum_j |z_{l,j} - z0_{l,j}|         the constraint of one sample (--constraint, --reduce, --scale)
    L = CE(response tokens) + alpha_t C          averaged over the samples of a step
    alpha_t = warm-up alpha for the first --warmup-steps steps, then alpha            (ProCon_wu; ProCon_s: no warm-up)

    python procon.py --data data/instructions.json --alpha 0 --out runs/ift                     # plain IFT
    python procon.py --data data/instructions.json --alpha 0.01 --out runs/procon_s              # ProCon_s
    python procon.py --data data/instructions.json --warmup-epochs 1 --warmup-alpha 1 \\
        --safety-data data/harmful.json --out runs/procon_wu_safe                                # ProCon_wu_safe
    python procon.py --merge runs/procon_wu_safe/adapter --out runs/merged      # base model + adapter, unquantised

A step, in this file's order: pairs encoded with their loss masks, in fixed batches; one forward pass gives the CE and
the hidden states the constraint reads; z, C, L; AdamW at the scheduled rate. LoRA on the attention projections by
default (QLoRA with --load-in-4bit; --full: every weight). A killed run continues with --resume.
"""
import math
import os
import random
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F
from tqdm import tqdm

import artifacts
import chat
import cli
import inference
import judges
import loading
import rundir
import runrecord
import training


# ============================================================================ the data: pairs, loss masks, batches
def encode_pair(tok, prompt, response, max_length, tokens="prompt", ce=True):
    """Chat-format one pair: (token ids, labels, constraint mask).

    labels are -100 on the prompt, so the loss is on response tokens only (on none with ce=False); the constraint
    mask marks the tokens whose projections the constraint reads (--constrained-tokens)."""
    ids, n_prompt = chat.pair_tokens(tok, prompt, response)
    ids = ids[:max_length]
    response_mask = [0] * min(n_prompt, len(ids)) + [1] * max(0, len(ids) - n_prompt)
    labels = [t if m and ce else -100 for t, m in zip(ids, response_mask)]
    if tokens == "response":
        cmask = response_mask
    elif tokens == "prompt":  # the post-instruction position r_hat_l is read at: the prompt's last token
        cmask = [int(i == min(n_prompt, len(ids)) - 1) for i in range(len(ids))]
    else:
        cmask = [1] * len(ids)
    return ids, labels, cmask


def fixed_batches(examples, batch_size, grad_accum, seed):
    """Optimizer batches of batch_size * grad_accum samples of similar length, composed once (every epoch and the
    anchors' pass see the same ones), each split into grad_accum micro-batches: 2 x 4 holds what 1 x 8 holds."""
    size = batch_size * grad_accum
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), i))
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    random.Random(seed).shuffle(batches)
    return [[b[i:i + batch_size] for i in range(0, len(b), batch_size)] for b in batches]


def collate(examples, pad_id):
    """Right padding for training: positions start at 0 for every sample, as they did in pre-training. Returns
    (input ids, attention mask, labels, constraint mask)."""
    n = max(len(e[0]) for e in examples)
    input_ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    cmask = torch.zeros((len(examples), n), dtype=torch.bool)
    for i, (ids, lab, cm) in enumerate(examples):
        input_ids[i, :len(ids)], labels[i, :len(lab)], mask[i, :len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
        cmask[i, :len(cm)] = torch.tensor(cm, dtype=torch.bool)
    return input_ids, mask, labels, cmask


# ============================================================================ the method
# mu_l - nu_l, and its unit vector (the same lines as in actor.py and directions.py; tests/test_layout.py)
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


# r_hat_l: the initial model's r-direction at every layer, frozen
def r_directions(model, tok, harmful, harmless, batch_size, desc):
    """r_hat_l = normalise(mu_l - nu_l) at the input of every layer l >= 1, the prompt's last token ([L, d]; r_hat_0
    = 0: the input of layer 0 is the embedding of the template's last token, the same for every prompt)."""
    mean_diff = difference_in_means(inference.capture(model, tok, harmful, 1, batch_size, desc + " (harmful)"),
                                    inference.capture(model, tok, harmless, 1, batch_size, desc + " (harmless)"))
    r_hat = torch.zeros_like(mean_diff[:-1, -1])
    r_hat[1:] = unit(mean_diff[1:-1, -1], "r-direction (harmful - harmless)")
    return r_hat


# the forward pass that gives both CE and the hidden states the constraint reads
def forward(model, batch, device, hidden=True, ce_chunk=0):
    """One forward pass: the summed CE of its response tokens, the hidden states the constraint reads (hidden=True;
    hidden_states[l] is the input of layer l) and the constraint mask. The constraint costs no second forward: it
    reads the residual stream of this same pass, which backward keeps anyway. With hidden=False (alpha = 0) nothing
    but the logits is asked for: plain IFT.

    Logits are made only where some sample's next token carries loss (the prompt's share of a [tokens, vocabulary]
    tensor, the largest of a step with a 128k vocabulary, is never made); with ce_chunk > 0 they are made ce_chunk
    tokens at a time from the final hidden state and recomputed in backward, so that no more are ever alive."""
    input_ids, mask, labels, cmask = (t.to(device) for t in batch)
    target = labels[:, 1:]
    keep = (target != -100).any(0).nonzero().squeeze(-1)
    if not ce_chunk:
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False,
                    logits_to_keep=keep)
        logits = out.logits.float()
        ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, keep].reshape(-1),
                                 ignore_index=-100, reduction="sum")
        return ce_sum, out.hidden_states, cmask
    out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                logits_to_keep=keep[:0])
    h, y = out.hidden_states[-1][:, :-1][target != -100], target[target != -100]
    head, cfg = model.get_output_embeddings(), model.config.get_text_config()
    ce_sum = h.float().sum() * 0  # in the graph even for a batch whose samples carry no CE (--safety-role constraint)
    for i in range(0, len(y), ce_chunk):
        ce_sum = ce_sum + torch.utils.checkpoint.checkpoint(chunk_ce, h[i:i + ce_chunk], y[i:i + ce_chunk], head, cfg,
                                                            use_reentrant=False)
    return ce_sum, (out.hidden_states if hidden else None), cmask


def chunk_ce(h, y, head, cfg):
    """Summed CE of one chunk of final hidden states, through the output head and the logit scalings some models
    apply after it (Gemma-2's soft-capping, Granite's and Cohere's scales)."""
    logits = head(h).float()
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "logit_scale", None):
        logits = logits * cfg.logit_scale
    if getattr(cfg, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
    return F.cross_entropy(logits, y, reduction="sum")


def constrained_layers(spec, n_layers):
    """--layers: 'all' is 1..L-1. [choice] The abstract says the constraint is on "the hidden state"; the input of
    layer 0 is the token embedding, and every chat-formatted prompt ends in the same template token, so r_hat_0 is 0."""
    layers = list(range(1, n_layers)) if spec == "all" else spec
    bad = [l for l in layers if not 1 <= l < n_layers]
    if bad:
        cli.fail(f"--layers: layer {bad[0]} is out of range for a model with {n_layers} layers (1..{n_layers - 1}; "
                "the input of layer 0 is the embedding, whose r_hat_0 is 0)")
    return layers


# z: the projections the constraint reads
def projections(hidden_states, cmask, r_hat, layers):
    """z_{l,j} = r_hat_l . x_{l,j} for every constrained layer l and constrained token j: [n_layers, n_tokens].

    hidden_states[l] is the residual-stream input of layer l; tokens are taken in row-major order, so a batch's
    tokens are its samples' tokens one sample after another. (Layers spread by --device-map: each read where it is.)"""
    return torch.stack([(h[cmask.to(h.device)].float() @ r_hat[l].to(h.device)).to(r_hat.device)
                        for h, l in ((hidden_states[l], l) for l in layers)])


# C: the constraint
def constraint(z, z0, kind="abs", reduce="sum", n_samples=1, n_positions=None, scale=None):
    """sum_l sum_j |z_{l,j} - z0_{l,j}| per sample (--reduce sum), or the mean over layers and constrained tokens
    (--reduce mean); (z - z0)^2 with --constraint sq. n_samples and n_positions are those of the whole optimizer step.
    [choice] The abstract gives no normalisation; with --scale anchor-rms each layer's deviation is divided by the RMS
    of its anchors (scale: [n_layers])."""
    diff = (z - z0).abs() if kind == "abs" else (z - z0) ** 2
    diff = diff / scale[:, None] if scale is not None else diff
    if reduce == "mean":
        return diff.sum() / (z.shape[0] * max(n_positions or z.shape[1], 1))
    return diff.sum() / n_samples


# L: the loss
def training_loss(model, micro, device, r_hat, z0, alpha, layers, args, norm, scale=None):
    """L = CE + alpha_t C for one micro-batch. Both terms are normalised by the whole optimizer step (norm: its
    response tokens and samples), so that --grad-accum 2 --batch-size 4 sums to exactly the loss of --batch-size 8.
    The constraint reads the hidden states of the same forward pass as CE. Returns (loss, ce, constraint)."""
    ce_sum, hs, cmask = forward(model, micro, device, hidden=alpha != 0, ce_chunk=args.ce_chunk)
    ce = ce_sum / max(norm["tokens"], 1)
    if alpha == 0:
        return ce, ce, torch.zeros((), device=ce.device)
    z = projections(hs, cmask, r_hat, layers)
    reg = constraint(z, z0.to(z.device), args.constraint, args.reduce, norm["samples"], norm["positions"], scale)
    return ce + alpha * reg.to(ce.device), ce, reg


# alpha_t: the warm-up schedule
def alpha_at(step, args, warm):
    """ProCon_wu: --warmup-alpha for the first `warm` steps (--warmup-steps or --warmup-epochs), then --alpha."""
    return args.warmup_alpha if step < warm else args.alpha


# z0: the anchors
@torch.no_grad()
def anchors(model, examples, batches, r_hat, layers, pad_id):
    """z0 of every example (its constrained tokens) under the initial weights, and the RMS of the anchors per layer
    (--scale anchor-rms): one pass before training, over the same batches."""
    z0 = [None] * len(examples)
    for idx in tqdm([m for b in batches for m in b], desc="anchors z0", leave=False):
        _, hs, cmask = forward(model, collate([examples[i] for i in idx], pad_id), loading.model_device(model))
        z = projections(hs, cmask, r_hat, layers).cpu()
        for i, part in zip(idx, torch.split(z, cmask.sum(1).tolist(), dim=1)):
            z0[i] = part.clone()
    return {"z0": z0, "rms": torch.cat(z0, dim=1).pow(2).mean(1).sqrt().clamp(min=1e-6)}


# the drift of the r-direction, as the paper measures it
def drift(r0, r1, layers):
    """Cosine of each layer's re-extracted r-direction to the initial one."""
    return {l: F.cosine_similarity(r0[l], r1[l], dim=0).item() for l in layers}


# ============================================================================ the loop
def lr_at(step, total, lr, ramp=0.0, schedule="constant"):
    """Learning rate of optimizer step `step` of `total`: a linear ramp over a fraction `ramp` of the steps, then
    constant, linear or cosine decay."""
    warm = int(total * ramp)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    return lr * {"constant": 1.0, "linear": 1.0 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t))}[schedule]


def train(run):
    """Optimizer steps over the fixed batches, their order shuffled per epoch with the seed; an evaluation point
    (held-out CE, drift, refusal) before the first step and every --eval-every steps, and at each epoch's end, with a
    checkpoint (and every --save-every steps). `run` holds the model, the optimizer, the data, the anchors and the log;
    run.step counts the steps done (a resumed run starts after its checkpoint's). [choice] The model stays in eval mode
    (dropout off; the abstract does not say): with the same weights and the same batch, z = z0 exactly at step 0."""
    args, per_epoch, total = run.args, len(run.batches), run.total
    if args.eval_every and run.step == 0:
        evaluation(run)
    while run.step < total:
        epoch, at = divmod(run.step, per_epoch)
        order = list(range(per_epoch))
        random.Random(args.seed * 1000 + epoch).shuffle(order)  # batch order per epoch: resumable, reproducible
        bar = tqdm(order[at:min(per_epoch, total - epoch * per_epoch)], desc=f"epoch {epoch + 1}/{args.epochs}")
        for b in bar:
            alpha = alpha_at(run.step, args, run.warm)
            if args.reset_optimizer and run.step == run.warm > 0:
                # [choice] One AdamW runs throughout by default. Its second moments (beta2 = 0.999: a memory of ~1000
                # steps) still hold the warm-up's far larger gradients and shrink every CE step after it; on short
                # runs that stalls learning (results/procon.md). --reset-optimizer starts it afresh after the warm-up.
                run.opt = torch.optim.AdamW(run.params, lr=args.lr, weight_decay=0.0)
            ce, reg = step(run, run.batches[b], alpha)
            run.log["steps"].append({"epoch": epoch + 1, "ce": ce, "constraint": reg, "alpha": alpha,
                                     "lr": run.opt.param_groups[0]["lr"]})
            bar.set_postfix(alpha=f"{alpha:g}", ce=f"{ce:.3f}", con=f"{reg:.3f}")
            if run.step % per_epoch == 0 or run.step == total or args.eval_every and run.step % args.eval_every == 0:
                evaluation(run)  # at each epoch's end, after the last step and every --eval-every steps
            if run.step % per_epoch == 0 or (args.save_every and run.step % args.save_every == 0):
                training.checkpoint(run.work, run.step, run.model, run.opt, {"log": run.log})  # rank 0 writes


def step(run, batch, alpha):
    """One optimizer step over the micro-batches of one batch. Returns its (CE, constraint)."""
    args = run.args
    micros = [collate([run.examples[i] for i in m], run.pad_id) for m in batch]
    input_ids, mask, labels, cmask = zip(*micros)
    norm = {"tokens": sum(int((lab[:, 1:] != -100).sum()) for lab in labels), "samples": sum(len(m) for m in batch),
            "positions": sum(int(cm.sum()) for cm in cmask)}
    for g in run.opt.param_groups:
        g["lr"] = lr_at(run.step, run.total, args.lr, args.lr_warmup_ratio, args.lr_scheduler)
    run.opt.zero_grad(set_to_none=True)
    ce_step, reg_step = 0.0, 0.0
    for m, micro in run.parallel.share(zip(batch, micros)):  # data parallel: this process's micro-batches
        z0 = torch.cat([run.z0[i] for i in m], dim=1) if alpha != 0 else None
        loss, ce, reg = training_loss(run.model, micro, run.device, run.r_hat, z0, alpha, run.layers, args, norm,
                                      run.scale)
        if not torch.isfinite(loss):  # the flags most likely to blame are named; the checkpoint, where one exists
            kept = rundir.last_checkpoint(run.work)
            cli.check_finite(loss, f"the loss at step {run.step + 1}", f" with --overwrite (the checkpoint of step "
                            f"{kept[0]} is kept)" if kept else " with --overwrite (no checkpoint was written yet)")
        loss.backward()
        ce_step, reg_step = ce_step + ce.item(), reg_step + reg.item()
    ce_step, reg_step = run.parallel.sum_gradients(run.params, ce_step, reg_step)  # all processes': the whole step
    run.opt.step()
    run.step += 1
    return ce_step, reg_step


@torch.no_grad()
def evaluate_ce(model, examples, batch_size, pad_id, device):
    """Token-weighted CE on the response tokens of held-out pairs: the task loss."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id)
        total += forward(model, batch, device, hidden=False)[0].item()
        count += int((batch[2][:, 1:] != -100).sum())
    return total / max(count, 1)


def refusal_rates(model, tok, sets, tokens, batch_size):
    """The share of each set's prompts ({name: prompts}) that the model refuses by the logit judge (score above 0)."""
    return {name: (judges.logit_scores(model, tok, prompts, tokens, batch_size, desc=f"refusal ({name})") > 0)
            .float().mean().item() for name, prompts in sets.items()}


def evaluation(run):
    """The evaluation point of the current step (made once, logged): held-out CE, the drift of the re-extracted probe
    direction and the refusal rate of every --eval-refusal file."""
    done = [e for e in run.log["evals"] if e["step"] == run.step]
    if done:
        return done[0]
    t = time.time()
    eval_ce = evaluate_ce(run.model, run.eval_examples, run.args.batch_size, run.pad_id, run.device) \
        if run.eval_examples else None
    try:  # the probe prompts passed at step 0: after a step, a zero direction is the training's doing, not theirs
        r_probe = r_directions(run.model, run.tok, run.probes["probe_harmful"], run.probes["probe_harmless"],
                               run.args.batch_size, "drift probe")
    except cli.UserError as e:
        raise cli.UserError(f"after step {run.step}, {e}: training diverged; a smaller --lr or --alpha" if run.step
                           else str(e)) from None
    point = {"step": run.step, "eval_ce": eval_ce, "drift": drift(run.r_probe0, r_probe, range(1, len(r_probe))),
             "refusal": refusal_rates(run.model, run.tok, run.refusal_sets, run.refusal_tokens,
                                             run.args.batch_size)}
    run.log["evals"].append({**point, "seconds": round(time.time() - t, 1)})
    return point


# ============================================================================ main
def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return artifacts.merge("adapter", args.merge, args)
    args.model = args.model or loading.default_model()
    check_args(args)
    parallel = training.init_distributed(args)  # under torchrun or accelerate launch: one process per device
    runrecord.seed_everything(args.seed)
    t0 = time.time()

    # 1. data: benign pairs, safety samples (ProCon_safe), held-out pairs, the prompts of r_hat_l and of the drift
    pairs = chat.sample(training.read_pairs(args.data), args.limit, args.seed)
    safety = training.read_pairs(args.safety_data, chat.read_prompts(args.refusals), args.seed)[:args.safety_n] \
        if args.safety_data else []
    eval_pairs = training.read_pairs(args.eval_data) if args.eval_data else []
    probes = {k: chat.read_prompts(vars(args)[k]) for k in ("harmful", "harmless", "probe_harmful", "probe_harmless")}
    refusal_sets = {os.path.splitext(os.path.basename(f))[0]: chat.read_prompts(f) for f in args.eval_refusal}
    chat.check_groups({"harmful": probes["harmful"], "harmless": probes["harmless"]})
    chat.check_groups({"probe harmful": probes["probe_harmful"], "probe harmless": probes["probe_harmless"]})
    settings = rundir.settings(args, FILES, ("epochs", "max_steps", "save_every", "save_merged"))
    with training.rank0_run_folder(args.out, outputs(args), args.overwrite, args.resume, settings, KNOWN,
                                   True, read=rundir.reads(args)) as work:
        # 2. model, constrained layers, training examples in fixed batches
        model, tok = loading.load(args)
        training.keep_4bit_trainable(model)
        run = types.SimpleNamespace(args=args, work=work, tok=tok, pad_id=tok.pad_token_id, probes=probes, step=0,
                                    device=loading.model_device(model), refusal_sets=refusal_sets, parallel=parallel)
        run.refusal_tokens, run.refusal_tokens_added = judges.logit_tokens(tok, args.direction, [a for _, a in safety])
        run.layers = constrained_layers(args.layers, loading.text_config(model).num_hidden_layers)
        run.examples = [encode_pair(tok, p, a, args.max_length, args.constrained_tokens) for p, a in pairs] + \
            [encode_pair(tok, p, a, args.max_length, args.constrained_tokens, ce=args.safety_role == "ce+constraint")
             for p, a in safety]
        run.eval_examples = [encode_pair(tok, p, a, args.max_length) for p, a in eval_pairs]
        run.cut = check_examples(model, run.examples, run.eval_examples, args, len(safety))
        run.batches = fixed_batches(run.examples, args.batch_size, args.grad_accum, args.seed)
        run.total = min(args.epochs * len(run.batches), args.max_steps or args.epochs * len(run.batches))
        run.warm = args.warmup_steps or args.warmup_epochs * len(run.batches)
        if args.ce_chunk:  # the chunked CE must equal the model's own on the first batch
            check_ce_chunk(forward, model, collate([run.examples[i] for i in run.batches[0][0]], run.pad_id),
                           run.device, args.ce_chunk)

        # 3. the r-directions of the initial model, frozen, and the probe direction that drift is measured against
        # 4. the anchors z0 = r_hat_l . x_{l,j} under the initial weights (kept in the run's folder for --resume)
        run.r_probe0 = r_directions(model, tok, probes["probe_harmful"], probes["probe_harmless"], args.batch_size,
                                    "probe")
        start = training.from_rank0(lambda: anchors_of_run(work, run, model, probes))  # rank 0's, sent to the others
        run.r_hat, run.z0 = start["r_hat"].to(run.device), start["z0"]
        run.scale = start["rms"].to(run.device) if args.scale == "anchor-rms" and start["rms"] is not None else None

        # 5. trainable parameters (LoRA or all), AdamW, and the last checkpoint when resuming
        run.model, run.params = training.make_trainable(model, args)
        run.opt = torch.optim.AdamW(run.params, lr=args.lr, weight_decay=0.0)
        run.log = {"steps": [], "evals": []}
        state = training.restore(work, run.model, run.opt) if args.resume else None
        if state:  # resuming after the checkpoint's step
            run.step, run.log = state["step"], {"evals": [], **state["log"]}

        # 6. the loop, then 7. the outputs: the adapter or full model, the log, the drift, the merged model if asked
        train(run)
        write_outputs(work, run, pairs, safety, t0)


def anchors_of_run(work, run, model, probes):
    """r_hat_l and z0 of a new run (no z0 without a constraint), saved in the run's folder; a resumed run's, read."""
    start = training.read_saved(work, "anchors.pt", run.args.out) if run.args.resume else None
    if start is not None:
        return start
    r_hat = r_directions(model, run.tok, probes["harmful"], probes["harmless"], run.args.batch_size, "r-directions")
    start = {"r_hat": r_hat, "z0": None, "rms": None}
    if run.args.alpha > 0 or (run.warm and run.args.warmup_alpha > 0):
        start.update(anchors(model, run.examples, run.batches, r_hat.to(run.device), run.layers, run.pad_id))
    runrecord.save_torch(os.path.join(work, "anchors.pt"), start)
    return start


# ============================================================================ checks and outputs
@torch.no_grad()
def check_ce_chunk(forward, model, batch, device, ce_chunk):
    """--ce-chunk computes logits itself (forward(..., ce_chunk)); on the first batch it must give the model's own CE,
    or the run stops."""
    plain, chunked = forward(model, batch, device, False)[0], forward(model, batch, device, False, ce_chunk)[0]
    if not torch.isclose(plain, chunked, rtol=1e-4, atol=1e-3):
        cli.fail(f"--ce-chunk: this model's logits are not its output head on the last hidden state (CE "
                f"{plain.item():.4f} vs {chunked.item():.4f}); leave --ce-chunk out")


# [choice] Data that would silently lose its effect (a training pair whose response --max-length cuts off adds nothing
# to the loss) is counted, warned about and recorded; where it is more than LOST_LIMIT of its set the run is refused:
# most of what the user gave would do nothing.
LOST_LIMIT = 0.5


def check_lost(lost, total, what, cause, fix):
    """`lost` of `total` items have lost their effect through `cause`: refused above LOST_LIMIT, else warned about.
    Returns lost, for the outputs to record."""
    if total and lost > LOST_LIMIT * total:
        cli.fail(f"{cause} {lost} of the {total} {what} (more than {LOST_LIMIT:.0%}); {fix}")
    if lost:
        print(f"warning: {cause} {lost} of the {total} {what}; they add nothing (counted in the outputs)",
              file=sys.stderr)
    return lost


def check_args(args):
    """What the flags' types cannot check alone, before any work."""
    cli.check_model_args(args)
    if args.warmup_epochs > args.epochs:
        cli.fail(f"--warmup-epochs {args.warmup_epochs}: must be at most --epochs {args.epochs}")
    if args.warmup_epochs and args.warmup_steps:
        cli.fail("--warmup-epochs and --warmup-steps both set the warm-up's length; pass one of them")
    if args.full and args.save_merged:
        cli.fail("--save-merged merges a LoRA adapter; --full already writes the whole model to --out/model")
    if args.full and args.load_in_4bit:
        cli.fail("--full cannot train a 4-bit model; use LoRA (QLoRA) with --load-in-4bit")


def check_examples(model, examples, eval_examples, args, n_safety):
    """Encoded pairs: within the model's context; those that carry CE (the last n_safety carry none with --safety-role
    constraint) and those of --eval-data that --max-length leaves without response tokens add nothing: counted, and
    refused above LOST_LIMIT."""
    chat.check_context(model, [len(e[0]) for e in examples], what="training pairs (after --max-length)")
    n_ce = len(examples) - (n_safety if args.safety_role == "constraint" else 0)
    return [check_lost(sum(all(l == -100 for l in e[1]) for e in found), len(found), what, f"--max-length "
                          f"{args.max_length} leaves no response tokens in", "raise --max-length or shorten them")
            for what, found in (("training pairs", examples[:n_ce]), ("held-out pairs of --eval-data", eval_examples))]


# (what surrounds the method in procon.py: its data and run flags, the checks of its flags and encoded pairs, and
# what it writes; the method itself, from the encoding of a pair to the optimizer step, stays in procon.py)
FILES = ("data", "safety_data", "refusals", "eval_data", "eval_refusal", "direction", "harmful", "harmless",
         "probe_harmful", "probe_harmless", "chat_template")  # resume compares their contents


KNOWN = ("procon.json", "drift.json", "drift.png", "adapter", "model", "merged", "checkpoint", "anchors.pt")


def outputs(args):
    """What a run of procon.py writes to --out."""
    return ("procon.json", "drift.json", "drift.png", "model" if args.full else "adapter") + \
        (("merged",) if args.save_merged else ())


def epoch_summaries(log, per_epoch):
    """Each epoch's mean CE and constraint, its last alpha, and the evaluation point at its end."""
    out = []
    for epoch in sorted({s["epoch"] for s in log["steps"]}):
        steps = [s for s in log["steps"] if s["epoch"] == epoch]
        point = next(e for e in log["evals"] if e["step"] == (epoch - 1) * per_epoch + len(steps))
        out.append({"epoch": epoch, "alpha": steps[-1]["alpha"], "steps": len(steps), "ce": statistics.mean(
            s["ce"] for s in steps), "constraint": statistics.mean(s["constraint"] for s in steps),
            **{k: point[k] for k in ("eval_ce", "drift", "refusal")}})
    return out


def plot_lines(path, series, xlabel, ylabel, title):
    """A figure of lines, one per {label: (xs, ys)}, written to path."""
    plt = runrecord.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker=".", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    runrecord.save_figure(fig, path)


def write_outputs(work, run, pairs, safety, t0):
    """The adapter (or full model), procon.json (the log: steps, epochs, evaluation points), drift.json and drift.png;
    the merged model with --save-merged; the summary table of the evaluation points. Rank 0 alone (data parallel)."""
    if training.RANK:
        return
    args, log = run.args, run.log
    name = "model" if args.full else "adapter"
    training.trainable_state(run.model, run.step)  # finite, or nothing is written
    artifacts.save_trained(os.path.join(work, name), run.model, run.tok,
                           None if args.full else artifacts.record(args.model, run.model.config))
    n_layers = loading.text_config(run.model).num_hidden_layers
    meta = runrecord.metadata(args, [getattr(args, k) for k in FILES])
    log["epochs"] = epoch_summaries(log, len(run.batches))
    drift_log = {str(e["epoch"]): e["drift"] for e in log["epochs"]}
    runrecord.save_json(os.path.join(work, "procon.json"), {
        "model": args.model, "layers": run.layers, "activation": "input of each constrained layer",
        "n_train": len(pairs), "n_safety": len(safety), "n_cut_by_max_length": dict(zip(("train", "eval"), run.cut)),
        "seed": args.seed, "refusal_tokens": run.refusal_tokens, "refusal_tokens_added": run.refusal_tokens_added,
        "seconds": round(time.time() - t0, 1),
        "peak_memory_mib": loading.peak_memory_mib(run.device), **log, **meta})
    runrecord.save_json(os.path.join(work, "drift.json"), {"model": args.model, "cosine_to_initial": drift_log,
                                                    "layers": list(range(1, n_layers)), **meta})
    plot_lines(os.path.join(work, "drift.png"), {f"epoch {e}": ([int(l) for l in c], list(c.values())) for e, c in
                                                   drift_log.items()}, "layer (its input)", "cosine to the initial "
                 "direction", f"refusal-direction drift: {os.path.basename(str(args.model).rstrip('/'))}")
    deep = lambda e: statistics.mean(v for l, v in e["drift"].items() if int(l) >= n_layers // 2)  # noqa: E731
    rows = [[e["step"], "-" if e["eval_ce"] is None else f"{e['eval_ce']:.4f}", f"{deep(e):.4f}",
             *[f"{100 * v:.1f}" for v in e["refusal"].values()]] for e in sorted(log["evals"], key=lambda e: e["step"])]
    runrecord.print_table(["step", "held-out CE", "drift cos (deep half)",
                           *[f"% refused: {k}" for k in run.refusal_sets]],
                   rows)
    if args.save_merged:
        artifacts.save_merged(os.path.join(work, "merged"), "adapter", os.path.join(work, "adapter"), args.model, args)
    print(f"\nwrote {', '.join(outputs(args))} to {args.out} in {time.time() - t0:.0f}s (peak memory "
          f"{loading.peak_memory_mib(run.device):.0f} MiB; pairs whose response --max-length cut off: {run.cut[0]})")


# ============================================================================ arguments
def add_method_args(p):
    """ProCon's own flags: the constraint, its weight and schedule, where it reads."""
    g = p.add_argument_group("method (ProCon)")
    g.add_argument("--alpha", type=cli.number(lo=0), default=0.0, help="ProCon's alpha: the constraint's weight after "
                   "the warm-up (0: plain IFT; [choice]: the useful scale depends on --reduce and --scale, "
                   "results/procon.md); actor.py's --alpha is ACTOR's alpha, the size of a query's shift")
    g.add_argument("--warmup-epochs", type=cli.count(0), default=0, help="ProCon_wu: epochs of strong constraint first")
    g.add_argument("--warmup-steps", type=cli.count(0), default=0,
                   help="ProCon_wu: optimizer steps of strong constraint first (instead of --warmup-epochs)")
    g.add_argument("--warmup-alpha", type=cli.number(lo=0), default=1.0,
                   help="ProCon_wu: constraint weight during the warm-up ([choice])")
    g.add_argument("--reset-optimizer", action="store_true", help="start AdamW afresh when the warm-up ends "
                   "([choice]; the abstract is silent; see train())")
    g.add_argument("--layers", type=lambda t: t if t == "all" else cli.listed(cli.count(1))(t), default="all",
                   help="constrained layers: 'all' (1..L-1) or a list like 10,12,14; layer l is decoder block l "
                   "(0-based) and "
                   "the constraint reads its input, the stream entering it (as directions.py does; actor.py trains a "
                   "layer on its output)")
    g.add_argument("--constrained-tokens", choices=("prompt", "response", "all"), default="prompt",
                   help="tokens whose projections are constrained ([choice]; the abstract says 'each training "
                   "sample's hidden state'): the prompt's last token, where r_hat_l is defined and refusal is decided "
                   "(default), the response tokens, or every token")
    g.add_argument("--constraint", choices=("abs", "sq"), default="abs", help="|z - z0| ([choice]) or (z - z0)^2")
    g.add_argument("--reduce", choices=("sum", "mean"), default="sum",
                   help="sum over layers and constrained tokens, per sample ([choice]), or their mean")
    g.add_argument("--scale", choices=("raw", "anchor-rms"), default="raw",
                   help="raw projections, or each layer's deviation divided by the RMS of its anchors z0 (alpha then "
                   "means the same on any model and sequence length, with --reduce mean)")
    g.add_argument("--epochs", type=cli.count(1), default=3, help="training epochs ([choice]: 3 fits a CPU test bed)")
    g.add_argument("--max-steps", type=cli.count(1), default=None, help="stop after N optimizer steps")
    g.add_argument("--lr", type=cli.number(above=0), default=2e-4,
                   help="AdamW learning rate ([choice]: 2e-4, the usual LoRA rate)")
    g.add_argument("--lr-scheduler", choices=("constant", "linear", "cosine"), default="constant",
                   help="learning-rate schedule over all optimizer steps, after --lr-warmup-ratio")
    g.add_argument("--lr-warmup-ratio", type=cli.number(lo=0, below=1), default=0.0,
                   help="fraction of steps with a linear learning-rate ramp (not ProCon's warm-up: --warmup-*)")
    return g


def add_data_args(p):
    """The data flags: training pairs, safety samples, held-out pairs, the prompts of r_hat_l and of the drift probe."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=os.path.join(cli.DATA, "instructions.json"),
                   help="instruction-response pairs: JSON/JSONL/CSV with instruction(+input)/output, prompt/response "
                   "or question/answer")
    g.add_argument("--limit", type=cli.count(1), default=None, help="at most N training pairs (a seeded sample)")
    g.add_argument("--safety-data", default=None,
                   help="ProCon_safe: safety samples mixed into training; pairs, or prompts answered with --refusals")
    g.add_argument("--safety-n", type=cli.count(1), default=None, help="use at most N safety samples")
    g.add_argument("--safety-role", choices=("ce+constraint", "constraint"), default="ce+constraint",
                   help="safety samples enter the CE loss and the constraint ([choice]: the abstract's 'broaden the "
                   "data distribution'), or the constraint only (no CE on their refusals)")
    g.add_argument("--refusals", default=os.path.join(cli.DATA, "refusals.json"),
                   help="refusal answers for safety prompts that come without one")
    g.add_argument("--eval-data", default=None, help="held-out pairs: their CE is logged at every evaluation point")
    g.add_argument("--eval-refusal", action="append", default=[], help="prompt file whose refusal rate (the logit "
                   "judge: the first answer token's refusal score above 0) is logged at every evaluation point; "
                   "repeatable")
    g.add_argument("--direction", default=None, help="direction.pt (directions.py) whose refusal tokens the logit "
                   "judge reads (default: the model's tokens for 'I', 'Sorry', 'As', 'Unfortunately'); the first "
                   "tokens of the safety samples' refusals are added to them (procon.json: refusal_tokens_added)")
    g.add_argument("--eval-every", type=cli.count(0), default=0, help="an evaluation point (held-out CE, drift, "
                   "refusal) before training and every N optimizer steps, besides each epoch's end (0: epochs only)")
    g.add_argument("--harmful", default=os.path.join(cli.DATA, "harmful.json"), help="harmful prompts for r_hat_l")
    g.add_argument("--harmless", default=os.path.join(cli.DATA, "harmless.json"), help="harmless prompts for r_hat_l")
    g.add_argument("--probe-harmful", default=os.path.join(cli.DATA, "probe_harmful.json"),
                   help="fixed harmful probe set for the per-epoch drift of the refusal direction")
    g.add_argument("--probe-harmless", default=os.path.join(cli.DATA, "probe_harmless.json"),
                   help="fixed harmless probe set for the per-epoch drift")


def add_trainable_args(g, memory):
    """The flags of make_trainable: --full or LoRA (its rank, alpha and target modules) in group g, gradient
    checkpointing in the memory group."""
    memory.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each layer in backward instead of keeping its activations (less memory)")
    g.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA")
    g.add_argument("--lora-r", type=cli.count(1), default=8, help="LoRA rank ([choice] 8)")
    g.add_argument("--lora-alpha", type=cli.number(above=0), default=16, help="LoRA alpha ([choice] 16)")
    g.add_argument("--lora-targets", default="auto", help="modules that get LoRA adapters: 'auto' (the attention "
                   "projections of this model, fused or not), 'all-linear', or a list like q_proj,v_proj")


def add_run_args(p, method):
    """procon.py's memory and output flags (and the trainable ones, in its method group)."""
    g = cli.add_memory_args(p, batch_size=8)
    add_trainable_args(method, g)
    g.add_argument("--grad-accum", type=cli.count(1), default=None,
                   help="micro-batches of --batch-size per optimizer step (effective batch: their product; under "
                   "torchrun a multiple of the processes, which share them; default: the number of processes, 1 in "
                   "one process)")
    g.add_argument("--ce-chunk", type=cli.count(0), default=0, help="make the logits this many tokens at a time, "
                   "recomputed in backward (less memory with a large vocabulary; 0: all at once)")
    g.add_argument("--max-length", type=cli.count(2), default=256, help="truncate chat-formatted pairs to this many "
                   "tokens")
    g = cli.add_out_args(p, "runs/procon", resume="continue the unfinished run in --out from its last checkpoint; "
                        "every setting but --epochs, --max-steps, --save-every and --save-merged must be as it was")
    g.add_argument("--save-every", type=cli.count(0), default=0,
                   help="also checkpoint every N optimizer steps (0: at each epoch's end only)")
    g.add_argument("--save-merged", action="store_true", help="after training, also write the merged model "
                   "(unquantised base + adapter) to --out/merged")
    g.add_argument("--merge", default=None, metavar="ADAPTER_DIR",
                   help="instead of training: write the unquantised base model with this adapter merged to --out")
    g.add_argument("--other-model", action="store_true",
                   help="with --merge: merge an adapter trained on another model than --model")


def parse_args(argv=None):
    p = cli.parser(__doc__)
    method = add_method_args(p)
    add_data_args(p)
    cli.add_model_args(p)
    p.set_defaults(model=None)  # with --merge the base model comes from the adapter
    add_run_args(p, method)
    return p.parse_args(argv)


if __name__ == "__main__":
    cli.run_main(main)
