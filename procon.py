"""procon.py: instruction fine-tuning with ProCon's projection constraint on the refusal direction.

Du et al. 2025, "Anchoring Refusal Direction: Mitigating Safety Risks in Tuning via Projection Constraint"
(arXiv 2509.06795). Benign instruction fine-tuning (IFT) drifts the refusal direction and erodes refusals; ProCon
keeps each training sample's projection onto the (frozen, initial) refusal direction where it started.

    python procon.py --data data/instructions.json --alpha 0 --out runs/ift                     # plain IFT
    python procon.py --data data/instructions.json --alpha 0.1 --out runs/procon_s               # ProCon_s
    python procon.py --data data/instructions.json --warmup-epochs 2 --warmup-alpha 1 \\
        --safety-data data/harmful.json --out runs/procon_wu_safe                                # ProCon_wu_safe

LoRA on q/k/v/o by default (QLoRA with --load-in-4bit); --full fine-tunes every weight.
"""
import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import directions as D


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    D.add_model_args(p)
    p.set_defaults(batch_size=8)
    p.add_argument("--data", default=os.path.join(D.DATA, "instructions.json"),
                   help="instruction-response pairs: JSON/JSONL/CSV with instruction(+input)/output, "
                        "prompt/response or question/answer")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training pairs")
    p.add_argument("--safety-data", default=None,
                   help="ProCon_safe: safety samples mixed into training; pairs, or prompts answered with --refusals")
    p.add_argument("--safety-n", type=int, default=None, help="use at most N safety samples (the paper used 1,000)")
    p.add_argument("--refusals", default=os.path.join(D.DATA, "refusals.json"),
                   help="refusal answers for safety prompts that come without one")
    p.add_argument("--eval-data", default=None, help="held-out pairs: their CE loss is logged each epoch")
    p.add_argument("--harmful", default=os.path.join(D.DATA, "harmful.json"), help="harmful prompts for r_l")
    p.add_argument("--harmless", default=os.path.join(D.DATA, "harmless.json"), help="harmless prompts for r_l")
    p.add_argument("--probe-harmful", default=os.path.join(D.DATA, "probe_harmful.json"),
                   help="fixed harmful probe set for the per-epoch drift of the refusal direction")
    p.add_argument("--probe-harmless", default=os.path.join(D.DATA, "probe_harmless.json"),
                   help="fixed harmless probe set for the per-epoch drift")
    p.add_argument("--alpha", type=float, default=0.0, help="constraint weight after warm-up (0: plain IFT; "
                   "ProCon_s uses 0.1 to 0.2; the useful scale depends on the model, see the README)")
    p.add_argument("--warmup-epochs", type=int, default=0, help="ProCon_wu: epochs of strong constraint first")
    p.add_argument("--warmup-alpha", type=float, default=1.0, help="ProCon_wu: constraint weight during warm-up")
    p.add_argument("--reset-optimizer", action=argparse.BooleanOptionalAction, default=False,
                   help="start AdamW afresh when the warm-up ends (the paper is silent; see the loop)")
    p.add_argument("--layers", default="all", help="constrained layers: 'all' (1..L-1) or a list like 10,12,14")
    p.add_argument("--constraint", choices=("abs", "sq"), default="abs",
                   help="|z - z0| (the paper's L2 norm of a scalar) or (z - z0)^2")
    p.add_argument("--reduce", choices=("sum", "mean"), default="sum",
                   help="sum over layers and response tokens (the paper) or their mean")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (the paper: 10)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (the paper: 2e-4 with LoRA)")
    p.add_argument("--max-length", type=int, default=256, help="truncate chat-formatted pairs to this many tokens")
    p.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (the paper: 8)")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (the paper: 16)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="modules that get LoRA adapters")
    p.add_argument("--out", default="runs/procon", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last epoch checkpoint")
    return p.parse_args(argv)


# ============================================================================ data
def read_pairs(path, refusals=None, seed=0):
    """(prompt, response) pairs; a prompt-only file gets a refusal from `refusals` (seeded choice) when given."""
    rows = D.read_records(path)
    rng = random.Random(seed)
    pairs = []
    for r in rows:
        if r.get("instruction") is not None and r.get("output") is not None:  # Alpaca
            prompt = str(r["instruction"]).strip()
            if str(r.get("input") or "").strip():
                prompt += "\n\n" + str(r["input"]).strip()
            pairs.append((prompt, str(r["output"])))
        elif r.get("prompt") is not None and (r.get("response") or r.get("completion")) is not None:
            pairs.append((str(r["prompt"]).strip(), str(r.get("response") or r.get("completion"))))
        elif r.get("question") is not None and r.get("answer") is not None:  # GSM8K
            pairs.append((str(r["question"]).strip(), str(r["answer"])))
        elif refusals:
            pairs.append((_prompt_of(r), rng.choice(refusals)))
    pairs = [(p, a.strip()) for p, a in pairs if p and a and a.strip()]
    if not pairs:
        kind = "prompts" if refusals else "instruction-response pairs"
        D.fail(f"{path}: no usable {kind} (expected instruction/output, prompt/response or question/answer)")
    return pairs


def _prompt_of(row):
    return next((str(row[c]).strip() for c in D.PROMPT_COLUMNS if row.get(c) is not None), "")


def encode_pair(tok, prompt, response, max_length):
    """Chat-format one pair; labels are -100 on the prompt so that the loss is on response tokens only."""
    msgs = [{"role": "user", "content": prompt}]
    prompt_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
    if not full_text.startswith(prompt_text):  # a template that rewrites earlier turns: append the answer instead
        full_text = prompt_text + response + (tok.eos_token or "")
    n_prompt = len(tok(prompt_text, add_special_tokens=False).input_ids)
    ids = tok(full_text, add_special_tokens=False).input_ids[:max_length]
    labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
    return ids, labels


def collate(examples, pad_id):
    """Right padding for training: positions start at 0 for every sample, as they did in pre-training."""
    n = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)], labels[i, :len(lab)], mask[i, :len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
    return input_ids, mask, labels


def fixed_batches(examples, batch_size, seed):
    """Batches of similar length, composed once: every epoch and the anchor pass see the same batches."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


# ============================================================================ the method
def forward(model, batch, device, hidden=True):
    """One forward pass: CE on response tokens, and the hidden states that the constraint reads (hidden=True).

    The constraint costs no second forward: it reads the residual stream of this same pass, which backward keeps
    anyway. With hidden=False (alpha = 0) nothing but the logits is asked for: plain IFT as it would run without ProCon.
    """
    input_ids, mask, labels = (t.to(device) for t in batch)
    out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False)
    logits = out.logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    return ce, out.hidden_states, labels != -100


def projections(hidden_states, resp, r, layers):
    """z_{l,j} = r_l . x_{l,j} for every constrained layer l and response token j: [n_layers, n_tokens].

    hidden_states[l] is the residual-stream input to layer l; response tokens are taken in row-major order, so a
    batch's tokens are its samples' tokens one sample after another.
    """
    return torch.stack([(hidden_states[l][resp].float() @ r[l]) for l in layers])


def constraint(z, z0, resp, kind, reduce):
    """ProCon's regulariser: sum_l sum_j |z_{l,j} - z0_{l,j}|, averaged over the samples of the batch."""
    diff = (z - z0).abs() if kind == "abs" else (z - z0) ** 2
    if reduce == "mean":  # the paper is silent on normalisation; 'mean' averages over layers and tokens instead
        return diff.mean()
    return diff.sum() / resp.shape[0]


def alpha_at(epoch, args):
    """The schedule: warmup_alpha for the first warmup_epochs (ProCon_wu), then alpha (0: plain IFT)."""
    return args.warmup_alpha if epoch < args.warmup_epochs else args.alpha


def r_directions(model, tok, harmful, harmless, batch_size, desc):
    """r_l = normalise(mean harmful - mean harmless) of the input to every layer at the prompt's last token."""
    a = D.capture(model, tok, harmful, 1, batch_size, desc + " (harmful)")[:, :, -1]
    b = D.capture(model, tok, harmless, 1, batch_size, desc + " (harmless)")[:, :, -1]
    diff = (a.double().mean(0) - b.double().mean(0)).float()[:-1]  # [L, d]: inputs to layers 0..L-1
    return diff / diff.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def drift(r0, r1, layers):
    return {l: F.cosine_similarity(r0[l], r1[l], dim=0).item() for l in layers}


# ============================================================================ checkpoints
# what must not change between a killed run and its --resume (--epochs may grow, and alpha may be fixed after a NaN)
RESUME_KEYS = ("model", "data", "limit", "safety_data", "safety_n", "layers", "constraint", "reduce", "lr",
               "max_length", "full", "lora_r", "lora_alpha", "lora_targets", "batch_size", "seed", "warmup_epochs",
               "reset_optimizer")
def trainable_state(model):
    return {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}


def save_checkpoint(path, model, opt, state):
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file(trainable_state(model), os.path.join(tmp, "trainable.safetensors"))
    torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
    D.save_json(os.path.join(tmp, "state.json"), state)
    if os.path.isdir(path):
        os.replace(path, path + ".old")
    os.replace(tmp, path)  # the previous good checkpoint is replaced only once the new one is whole
    if os.path.isdir(path + ".old"):
        import shutil
        shutil.rmtree(path + ".old")


def load_checkpoint(path, model, opt):
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, "trainable.safetensors"))
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        D.fail(f"{path}: checkpoint does not match this run's trainable parameters (missing {sorted(missing)[0]})")
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in weights:
                v.copy_(weights[k])
    opt.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    return json.load(open(os.path.join(path, "state.json")))


# ============================================================================ main
def main(argv=None):
    args = parse_args(argv)
    outputs = ("procon.json", "drift.json", "drift.png", "model" if args.full else "adapter")
    if not args.resume:
        D.prepare_out(args.out, outputs + ("checkpoint",), args.overwrite)
    elif not os.path.isdir(os.path.join(args.out, "checkpoint")):
        D.fail(f"{args.out}/checkpoint: nothing to resume")
    if args.full and args.load_in_4bit:
        D.fail("--full cannot train a 4-bit model; use LoRA (QLoRA) with --load-in-4bit")
    D.seed_everything(args.seed)
    t0 = time.time()

    # ---- data: benign pairs, optional safety samples (ProCon_safe), held-out pairs, direction prompts
    pairs = read_pairs(args.data)[:args.limit]
    refusals = D.read_prompts(args.refusals)
    safety = read_pairs(args.safety_data, refusals, args.seed)[:args.safety_n] if args.safety_data else []
    eval_pairs = read_pairs(args.eval_data) if args.eval_data else []
    harmful, harmless = D.read_prompts(args.harmful), D.read_prompts(args.harmless)
    probe_harmful, probe_harmless = D.read_prompts(args.probe_harmful), D.read_prompts(args.probe_harmless)

    # ---- model
    model, tok = D.load_model(args.model, args.load_in_4bit, args.chat_template, args.trust_remote_code, args.device)
    n_layers = D.text_config(model).num_hidden_layers
    if args.layers == "all":
        # the paper constrains "all layers"; the input to layer 0 is the token embedding, and every chat-formatted
        # prompt ends in the same template token, so its harmful - harmless difference is exactly 0: no r_0 exists
        layers = list(range(1, n_layers))
    else:
        try:
            layers = sorted({int(x) for x in args.layers.split(",")})
        except ValueError:
            D.fail(f"--layers {args.layers!r}: expected 'all' or comma-separated layer indices")
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            D.fail(f"--layers: layer {bad[0]} is out of range for a model with {n_layers} layers (0..{n_layers - 1})")
    device = D.model_device(model)

    # ---- r-directions of the initial model, frozen (and the probe direction that drift is measured against)
    anchors_path = os.path.join(args.out, "anchors.pt")
    if args.resume:
        if not os.path.isfile(anchors_path):
            D.fail(f"{anchors_path}: missing, so the run in {args.out} cannot be resumed")
        anchors = torch.load(anchors_path, weights_only=True)
        r = anchors["r"]
    else:
        r = r_directions(model, tok, harmful, harmless, args.batch_size, "r-directions")
    r_probe0 = r_directions(model, tok, probe_harmful, probe_harmless, args.batch_size, "probe")
    r = r.to(device)

    # ---- trainable parameters: LoRA adapters (peft) or every weight
    if args.full:
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        # lora_dropout 0: the paper does not give it, and without dropout the step-0 constraint is exactly zero
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    examples = [encode_pair(tok, p, a, args.max_length) for p, a in pairs + safety]
    examples = [e for e in examples if any(l != -100 for l in e[1])]
    if not examples:
        D.fail(f"--max-length {args.max_length} leaves no response tokens in any training pair")
    batches = fixed_batches(examples, args.batch_size, args.seed)
    eval_examples = [encode_pair(tok, p, a, args.max_length) for p, a in eval_pairs]
    pad_id = tok.pad_token_id

    # ---- anchors z0 = r_l . x_l,j under the initial weights, one pass before training, same batches
    constrained = any(alpha_at(e, args) > 0 for e in range(args.epochs))
    if args.resume:
        z0 = anchors["z0"]
        if constrained and z0 is None:
            D.fail(f"the run in {args.out} was plain IFT (no anchors z0 recorded); it cannot be resumed with alpha > 0")
    elif not constrained:  # plain IFT: no anchors needed
        z0 = None
        D.save_torch(anchors_path, {"r": r.cpu(), "z0": z0, "layers": layers})
    else:
        z0 = [None] * len(examples)
        with torch.no_grad():
            for idx in tqdm(batches, desc="anchors z0", leave=False):
                _, hs, resp = forward(model, collate([examples[i] for i in idx], pad_id), device)
                z = projections(hs, resp, r, layers).cpu()
                counts = resp.sum(1).tolist()
                for i, part in zip(idx, torch.split(z, counts, dim=1)):
                    z0[i] = part.clone()
        D.save_torch(anchors_path, {"r": r.cpu(), "z0": z0, "layers": layers})

    # ---- the loop: loss = CE + alpha_t * sum_l sum_j |z_l,j(theta_t) - z0_l,j|
    # The model stays in eval mode (dropout off; the paper does not say, and SmolLM2/Llama/Qwen2 have dropout 0):
    # with the same weights and the same batch, z = z0 exactly at step 0.
    log = {"steps": [], "epochs": []}
    start_epoch = 0
    if args.resume:
        state = load_checkpoint(os.path.join(args.out, "checkpoint"), model, opt)
        changed = [k for k, v in state.get("config", {}).items() if k in RESUME_KEYS and getattr(args, k) != v]
        if changed:
            D.fail(f"--resume with a different --{changed[0].replace('_', '-')} than the run in {args.out} "
                   f"({getattr(args, changed[0])!r} vs {state['config'][changed[0]]!r})")
        log, start_epoch = state["log"], state["epoch"] + 1
        print(f"resuming after epoch {state['epoch'] + 1} of {args.epochs}")
    drift_log = {str(e["epoch"]): e["drift"] for e in log["epochs"]}
    for epoch in range(start_epoch, args.epochs):
        alpha = alpha_at(epoch, args)
        if args.reset_optimizer and args.warmup_epochs and epoch == args.warmup_epochs and alpha != args.warmup_alpha:
            # The paper is silent; by default one AdamW runs throughout, as in a plain training loop. But its second
            # moments (beta2 = 0.999: a memory of ~1000 steps) still hold the warm-up constraint's far larger gradients
            # and shrink every CE step after it; on short runs that stalls learning (bench/bench_procon.py measures both).
            opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        order = list(range(len(batches)))
        random.Random(args.seed * 1000 + epoch).shuffle(order)  # batch order per epoch: resumable, reproducible
        bar = tqdm(order, desc=f"epoch {epoch + 1}/{args.epochs} alpha={alpha:g}")
        for step, b in enumerate(bar):
            idx = batches[b]
            t_step = time.time()
            ce, hs, resp = forward(model, collate([examples[i] for i in idx], pad_id), device, hidden=alpha > 0)
            if alpha > 0:
                z = projections(hs, resp, r, layers)
                z_anchor = torch.cat([z0[i] for i in idx], dim=1).to(device)
                reg = constraint(z, z_anchor, resp, args.constraint, args.reduce)
            else:
                reg = torch.zeros((), device=device)
            loss = ce + alpha * reg
            if not torch.isfinite(loss):
                D.fail(f"loss is {loss.item()} at epoch {epoch + 1} step {step + 1}; the last good checkpoint in "
                       f"{args.out}/checkpoint is kept (try a lower --lr or --warmup-alpha)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log["steps"].append({"epoch": epoch + 1, "ce": ce.item(), "constraint": reg.item(), "alpha": alpha,
                                 "seconds": round(time.time() - t_step, 4)})
            bar.set_postfix(ce=f"{ce.item():.3f}", con=f"{reg.item():.3f}")

        # ---- end of epoch: held-out CE, drift of the re-extracted probe direction, checkpoint
        eval_ce = evaluate_ce(model, eval_examples, args.batch_size, pad_id, device) if eval_examples else None
        r_probe = r_directions(model, tok, probe_harmful, probe_harmless, args.batch_size, "drift probe")
        cos = drift(r_probe0, r_probe, range(1, n_layers))
        steps = [s for s in log["steps"] if s["epoch"] == epoch + 1]
        log["epochs"].append({"epoch": epoch + 1, "alpha": alpha, "ce": sum(s["ce"] for s in steps) / len(steps),
                              "constraint": sum(s["constraint"] for s in steps) / len(steps), "eval_ce": eval_ce,
                              "drift": cos})
        drift_log[str(epoch + 1)] = cos
        save_checkpoint(os.path.join(args.out, "checkpoint"), model, opt,
                        {"epoch": epoch, "log": log, "config": {k: getattr(args, k) for k in RESUME_KEYS}})

    # ---- outputs: the adapter or full model, the log, drift per layer and epoch
    if args.full:
        model.save_pretrained(os.path.join(args.out, "model"))
        tok.save_pretrained(os.path.join(args.out, "model"))
    else:
        model.save_pretrained(os.path.join(args.out, "adapter"))
    meta = D.metadata(args, [args.data, args.safety_data, args.eval_data, args.harmful, args.harmless,
                             args.probe_harmful, args.probe_harmless, args.refusals])
    D.save_json(os.path.join(args.out, "procon.json"), {
        "model": args.model, "layers": layers, "n_train": len(pairs), "n_safety": len(safety), "seed": args.seed,
        "seconds": round(time.time() - t0, 1), **log, **meta})
    D.save_json(os.path.join(args.out, "drift.json"), {"model": args.model, "cosine_to_initial": drift_log,
                                                      "layers": list(range(1, n_layers)), **meta})
    plot_drift(os.path.join(args.out, "drift.png"), drift_log, args.model)

    print(f"\n{'epoch':>5} {'alpha':>6} {'CE':>8} {'constraint':>11} {'held-out CE':>12} {'drift cos (deep half)':>22}")
    for e in log["epochs"]:
        deep = [v for l, v in e["drift"].items() if int(l) >= n_layers // 2]
        ev = f"{e['eval_ce']:.4f}" if e["eval_ce"] is not None else "-"
        print(f"{e['epoch']:>5} {e['alpha']:>6g} {e['ce']:>8.4f} {e['constraint']:>11.4f} {ev:>12} "
              f"{sum(deep) / len(deep):>22.4f}")
    print(f"\nwrote {args.out}/{'model' if args.full else 'adapter'}, procon.json, drift.json, drift.png "
          f"in {time.time() - t0:.0f}s")


@torch.no_grad()
def evaluate_ce(model, examples, batch_size, pad_id, device):
    """Token-weighted CE on response tokens of held-out pairs."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        input_ids, mask, labels = (t.to(device) for t in collate(examples[i:i + batch_size], pad_id))
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                                 reduction="sum").item()
        count += (target != -100).sum().item()
    return total / max(count, 1)


def plot_drift(path, drift_log, model_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for epoch, cos in sorted(drift_log.items(), key=lambda kv: int(kv[0])):
        ax.plot([int(l) for l in cos], list(cos.values()), marker=".", label=f"epoch {epoch}")
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine to the initial direction")
    ax.set_title(f"refusal-direction drift: {os.path.basename(str(model_name).rstrip('/'))}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    D.run_main(main)
