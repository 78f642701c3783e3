"""procon.py: instruction fine-tuning with ProCon's projection constraint on the refusal direction.

Du et al. 2025, "Anchoring Refusal Direction: Mitigating Safety Risks in Tuning via Projection Constraint"
(arXiv 2509.06795). Benign instruction fine-tuning (IFT) drifts the refusal direction and erodes refusals; ProCon
keeps each training sample's projection onto the (frozen, initial) refusal direction r_l where it started.

    python procon.py --data data/instructions.json --alpha 0 --out runs/ift                     # plain IFT
    python procon.py --data data/instructions.json --alpha 0.1 --out runs/procon_s               # ProCon_s
    python procon.py --data data/instructions.json --warmup-epochs 2 --warmup-alpha 1 \\
        --safety-data data/harmful.json --out runs/procon_wu_safe                                # ProCon_wu_safe
    python procon.py --merge runs/procon/adapter --out runs/procon-merged      # base model + adapter, unquantised

LoRA on the attention projections by default (QLoRA with --load-in-4bit); --full fine-tunes every weight. Every place
where the code chooses what the paper leaves open carries the tag [choice].
"""
import argparse
import json
import math
import os
import random
import shutil
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import plumbing as pl


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_model_args(p)
    p.set_defaults(batch_size=8, model=None)  # with --merge the base model comes from the adapter
    p.add_argument("--data", default=os.path.join(pl.DATA, "instructions.json"),
                   help="instruction-response pairs: JSON/JSONL/CSV with instruction(+input)/output, "
                        "prompt/response or question/answer")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training pairs")
    p.add_argument("--safety-data", default=None,
                   help="ProCon_safe: safety samples mixed into training; pairs, or prompts answered with --refusals")
    p.add_argument("--safety-n", type=int, default=None, help="use at most N safety samples (the paper used 1,000)")
    p.add_argument("--safety-role", choices=("ce+constraint", "constraint"), default="ce+constraint",
                   help="safety samples enter the CE loss and the constraint (the paper's mix), or the constraint only "
                   "(no CE on their refusals: what the constraint alone does with them)")
    p.add_argument("--refusals", default=os.path.join(pl.DATA, "refusals.json"),
                   help="refusal answers for safety prompts that come without one")
    p.add_argument("--eval-data", default=None, help="held-out pairs: their CE loss is logged each epoch")
    p.add_argument("--harmful", default=os.path.join(pl.DATA, "harmful.json"), help="harmful prompts for r_l")
    p.add_argument("--harmless", default=os.path.join(pl.DATA, "harmless.json"), help="harmless prompts for r_l")
    p.add_argument("--probe-harmful", default=os.path.join(pl.DATA, "probe_harmful.json"),
                   help="fixed harmful probe set for the per-epoch drift of the refusal direction")
    p.add_argument("--probe-harmless", default=os.path.join(pl.DATA, "probe_harmless.json"),
                   help="fixed harmless probe set for the per-epoch drift")
    p.add_argument("--alpha", type=float, default=0.0, help="constraint weight after warm-up (0: plain IFT; "
                   "ProCon_s uses 0.1 to 0.2; the useful scale depends on --reduce and --scale, results/procon.md)")
    p.add_argument("--warmup-epochs", type=int, default=0, help="ProCon_wu: epochs of strong constraint first")
    p.add_argument("--warmup-alpha", type=float, default=1.0, help="ProCon_wu: constraint weight during warm-up")
    p.add_argument("--reset-optimizer", action=argparse.BooleanOptionalAction, default=False,
                   help="start AdamW afresh when the warm-up ends (the paper is silent; see the loop)")
    p.add_argument("--layers", default="all", help="constrained layers: 'all' (1..L-1) or a list like 10,12,14")
    p.add_argument("--positions", choices=("prompt", "response", "all"), default="prompt",
                   help="tokens whose projections are constrained ([choice] the paper says 'each training sample's "
                   "hidden state'): the prompt's last token, where r_l is defined and refusal is decided (default), "
                   "the response tokens, or every token")
    p.add_argument("--constraint", choices=("abs", "sq"), default="abs",
                   help="|z - z0| (the paper's L2 norm of a scalar) or (z - z0)^2")
    p.add_argument("--reduce", choices=("sum", "mean"), default="sum",
                   help="sum over layers and constrained tokens, per sample (the paper) or their mean")
    p.add_argument("--scale", choices=("raw", "anchor-rms"), default="raw",
                   help="raw projections, or each layer's deviation divided by the RMS of its anchors z0 (alpha then "
                   "means the same on any model and sequence length, with --reduce mean)")
    p.add_argument("--epochs", type=int, default=3,
                   help="training epochs ([choice] the paper: 10; 3 fits a CPU test bed)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (default: all epochs)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (the paper: 2e-4 with LoRA)")
    p.add_argument("--lr-scheduler", choices=("constant", "linear", "cosine"), default="constant",
                   help="learning-rate schedule over all optimizer steps, after --warmup-ratio")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with a linear lr warm-up")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches of --batch-size per optimizer step (effective batch: their product)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in backward instead of keeping its activations (less memory)")
    p.add_argument("--ce-chunk", type=int, default=0, help="make the logits this many tokens at a time, recomputed in "
                   "backward (less memory with a large vocabulary; 0: all at once)")
    p.add_argument("--max-length", type=int, default=256, help="truncate chat-formatted pairs to this many tokens")
    p.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (the paper: 8)")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (the paper: 16)")
    p.add_argument("--lora-targets", default="auto", help="modules that get LoRA adapters: 'auto' (the attention "
                   "projections of this model, fused or not), 'all-linear', or a list like q_proj,v_proj")
    p.add_argument("--merge", default=None, metavar="ADAPTER_DIR",
                   help="instead of training: write the unquantised base model with this adapter merged to --out")
    p.add_argument("--save-merged", action="store_true", help="after training, also write the merged model "
                   "(unquantised base + adapter) to --out/merged")
    p.add_argument("--out", default="runs/procon", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    return p.parse_args(argv)


# ============================================================================ data
def read_pairs(path, refusals=None, seed=0):
    """(prompt, response) pairs; a prompt-only file gets a refusal from `refusals` (seeded choice) when given."""
    rows = pl.read_records(path)
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
            pairs.append((next((str(r[c]).strip() for c in pl.PROMPT_COLUMNS if r.get(c) is not None), ""),
                          rng.choice(refusals)))
    pairs = [(p, a.strip()) for p, a in pairs if p and a and a.strip()]
    if not pairs:
        kind = "prompts" if refusals else "instruction-response pairs"
        pl.fail(f"{path}: no usable {kind} (expected instruction/output, prompt/response or question/answer)")
    return pairs


def encode_pair(tok, prompt, response, max_length, positions="prompt", ce=True):
    """Chat-format one pair: (token ids, labels, constraint mask).

    labels are -100 on the prompt, so the loss is on response tokens only (on none with ce=False); the constraint
    mask marks the positions whose projections the constraint reads (--positions)."""
    prompt_text = pl.chat_text(tok, prompt)
    full_text = pl.chat_text(tok, prompt, response)
    if not full_text.startswith(prompt_text):  # a template that rewrites earlier turns: append the answer instead
        full_text = prompt_text + response + (tok.eos_token or "")
    n_prompt = len(tok(prompt_text, add_special_tokens=False).input_ids)
    ids = tok(full_text, add_special_tokens=False).input_ids[:max_length]
    response_mask = [0] * min(n_prompt, len(ids)) + [1] * max(0, len(ids) - n_prompt)
    labels = [t if m and ce else -100 for t, m in zip(ids, response_mask)]
    if positions == "response":
        cmask = response_mask
    elif positions == "prompt":  # the post-instruction position r_l is read at: the prompt's last token
        cmask = [int(i == min(n_prompt, len(ids)) - 1) for i in range(len(ids))]
    else:
        cmask = [1] * len(ids)
    return ids, labels, cmask


def collate(examples, pad_id):
    """Right padding for training: positions start at 0 for every sample, as they did in pre-training."""
    n = max(len(e[0]) for e in examples)
    input_ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    cmask = torch.zeros((len(examples), n), dtype=torch.bool)
    for i, (ids, lab, cm) in enumerate(examples):
        input_ids[i, :len(ids)], labels[i, :len(lab)], mask[i, :len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
        cmask[i, :len(cm)] = torch.tensor(cm, dtype=torch.bool)
    return input_ids, mask, labels, cmask


def fixed_batches(examples, batch_size, grad_accum, seed):
    """Optimizer batches of batch_size * grad_accum samples of similar length, composed once (every epoch and the
    anchor pass see the same ones), each split into grad_accum micro-batches: 2 x 4 holds what 1 x 8 holds."""
    size = batch_size * grad_accum
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), i))
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    random.Random(seed).shuffle(batches)
    return [[b[i:i + batch_size] for i in range(0, len(b), batch_size)] for b in batches]


# ============================================================================ the method
def r_directions(model, tok, harmful, harmless, batch_size, desc):
    """The r-direction of every layer: r_l = normalise(mean harmful - mean harmless) of the input to layer l at the
    prompt's last token (the difference in means of directions.py, at every layer at once). [L, d]"""
    a = pl.capture(model, tok, harmful, 1, batch_size, desc + " (harmful)")[:, :, -1]
    b = pl.capture(model, tok, harmless, 1, batch_size, desc + " (harmless)")[:, :, -1]
    diff = (a.double().mean(0) - b.double().mean(0)).float()[:-1]  # [L, d]: inputs to layers 0..L-1
    return diff / diff.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def forward(model, batch, device, hidden=True, ce_chunk=0):
    """One forward pass: the summed CE of its response tokens, the hidden states the constraint reads (hidden=True),
    and the constraint mask. The constraint costs no second forward: it reads the residual stream of this same pass,
    which backward keeps anyway. With hidden=False (alpha = 0) nothing but the logits is asked for: plain IFT.

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
    head, cfg = model.get_output_embeddings(), pl.text_config(model)
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


@torch.no_grad()
def check_ce_chunk(model, batch, device, ce_chunk):
    """--ce-chunk computes logits itself; on the first batch it must give the model's own CE, or the run stops."""
    plain, chunked = forward(model, batch, device, False)[0], forward(model, batch, device, False, ce_chunk)[0]
    if not torch.isclose(plain, chunked, rtol=1e-4, atol=1e-3):
        pl.fail(f"--ce-chunk: this model's logits are not its output head on the last hidden state (CE "
                f"{plain.item():.4f} vs {chunked.item():.4f}); leave --ce-chunk out")


def projections(hidden_states, cmask, r, layers):
    """Projection z_{l,j} = r_l . x_{l,j} for every constrained layer l and constrained token j: [n_layers, n_tokens].

    hidden_states[l] is the residual-stream input to layer l; tokens are taken in row-major order, so a batch's
    tokens are its samples' tokens one sample after another."""
    return torch.stack([(hidden_states[l][cmask].float() @ r[l]) for l in layers])


def constraint(z, z0, kind="abs", reduce="sum", n_samples=1, n_positions=None, scale=None):
    """ProCon's projection constraint: sum_l sum_j |z_{l,j} - z0_{l,j}| per sample (--reduce sum, the paper), or
    the mean over layers and constrained tokens (--reduce mean). n_samples and n_positions are those of the whole
    optimizer step (default: this batch's tokens). [choice] The paper is silent on normalisation; with --scale
    anchor-rms each layer's deviation is divided by the RMS of its anchors (scale: [n_layers])."""
    diff = (z - z0).abs() if kind == "abs" else (z - z0) ** 2
    if scale is not None:
        diff = diff / scale[:, None]
    if reduce == "mean":
        return diff.sum() / (z.shape[0] * max(n_positions or z.shape[1], 1))
    return diff.sum() / n_samples


def training_loss(model, micro, device, r, z0, alpha, layers, args, norm, scale=None):
    """ProCon's training loss for one micro-batch: L = CE + alpha_t * constraint.

    Both terms are normalised by the whole optimizer step (norm: its response tokens and samples), so that
    --grad-accum 2 --batch-size 4 sums to exactly the loss of --batch-size 8. Returns (loss, ce, constraint)."""
    ce_sum, hs, cmask = forward(model, micro, device, hidden=alpha != 0, ce_chunk=args.ce_chunk)
    ce = ce_sum / max(norm["tokens"], 1)
    if alpha == 0:
        return ce, ce, torch.zeros((), device=ce.device)
    z = projections(hs, cmask, r, layers)
    reg = constraint(z, z0.to(z.device), args.constraint, args.reduce, norm["samples"], norm["positions"], scale)
    return ce + alpha * reg, ce, reg


def alpha_at(epoch, args):
    """The schedule of ProCon_wu: warmup_alpha for the first warmup_epochs, then alpha (0: plain IFT)."""
    return args.warmup_alpha if epoch < args.warmup_epochs else args.alpha


def lr_at(step, total, args):
    """Learning rate of optimizer step `step` of `total`: linear warm-up, then constant, linear or cosine decay."""
    warm = int(total * args.warmup_ratio)
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    decay = {"constant": 1.0, "linear": 1.0 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t))}
    return args.lr * decay[args.lr_scheduler]


def drift(r0, r1, layers):
    """Cosine of each layer's re-extracted refusal direction to the initial one."""
    return {l: F.cosine_similarity(r0[l], r1[l], dim=0).item() for l in layers}


# ============================================================================ trainable parameters
ATTENTION = ("self_attn", "attention", "attn", "self_attention")


def linear_names(model):
    """Names (last component) of the linear layers inside the decoder blocks."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D)
    try:
        import bitsandbytes as bnb

        kinds += (bnb.nn.Linear4bit,)
    except ImportError:
        pass
    return {n.split(".")[-1] for block in pl.decoder_layers(model) for n, m in block.named_modules()
            if isinstance(m, kinds)}


def lora_targets(model, spec):
    """LoRA target modules: 'auto' finds the attention projections of this model (q/k/v/o, or fused ones such as
    qkv_proj, query_key_value, c_attn, with their output projection), 'all-linear' every linear layer, or a list
    that must name linear layers the model has."""
    have = linear_names(model)
    if spec == "all-linear":
        return "all-linear"
    if spec == "auto":
        block = pl.decoder_layers(model)[0]
        children = dict(block.named_children())
        attn_name = next((n for n in ATTENTION if n in children), None)
        if attn_name is None:
            pl.fail(f"--lora-targets auto: no attention module in {type(block).__name__}; name the targets among "
                    f"its linear layers: {', '.join(sorted(have))}")
        found = [f"{attn_name}.{n}" for n, m in children[attn_name].named_children() if n in have]
        if not found:
            pl.fail(f"--lora-targets auto: no linear layer in {attn_name}; name them among: {', '.join(sorted(have))}")
        return found
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    missing = [t for t in wanted if t.split(".")[-1] not in have]
    if missing or not wanted:
        named = ", ".join(missing) or repr(spec)
        pl.fail(f"--lora-targets: {named} not among this model's linear layers: "
                f"{', '.join(sorted(have))}")
    return wanted


def keep_4bit_trainable(model):
    """bitsandbytes repacks 4-bit weights for a faster CPU kernel on their first no-grad forward; that kernel adds a
    projection's bias in place, which autograd refuses (Qwen2, Phi: biased q/k/v). Training keeps the plain layout."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def make_trainable(model, args):
    """LoRA adapters on the chosen targets (peft), or every weight with --full. Returns (model, parameters)."""
    if args.full:
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model, args.lora_targets)
        print(f"LoRA r={args.lora_r} on {targets if isinstance(targets, str) else ', '.join(targets)}")
        # [choice] lora_dropout 0: the paper does not give it, and without dropout the step-0 constraint is exactly 0
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    if args.gradient_checkpointing:
        # use_reentrant=False: gradients reach the LoRA weights without input gradients being switched on. The
        # decoder blocks alone are put in training mode (transformers checkpoints only then); their submodules stay in
        # eval mode, so dropout stays off and z = z0 exactly at step 0.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for block in pl.decoder_layers(model):
            block.training = True
    return model, [p for p in model.parameters() if p.requires_grad]


# ============================================================================ checkpoints and resume
# what must not change between a killed run and its --resume (--epochs and --max-steps may grow; alpha may be changed
# after a NaN, and every step records the alpha it ran with)
RESUME_KEYS = ("model", "data", "limit", "ce_chunk", "safety_data", "safety_n", "safety_role", "layers", "positions", "constraint",
               "reduce", "scale", "lr", "lr_scheduler", "warmup_ratio", "max_length", "full", "lora_r", "lora_alpha",
               "lora_targets", "batch_size", "grad_accum", "seed", "warmup_epochs", "reset_optimizer",
               "system_prompt", "thinking")


def trainable_state(model):
    return {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}


def save_checkpoint(path, model, opt, state):
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file(trainable_state(model), os.path.join(tmp, "trainable.safetensors"))
    torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
    pl.save_json(os.path.join(tmp, "state.json"), state)
    if os.path.isdir(path):
        os.replace(path, path + ".old")
    os.replace(tmp, path)  # the previous good checkpoint is replaced only once the new one is whole
    shutil.rmtree(path + ".old", ignore_errors=True)


def read_resume(args):
    """Everything --resume needs, read and checked before the model is loaded: the anchors and the checkpoint's
    state; a run with other settings, a finished run, or a damaged file is refused."""
    ckpt, anchors_path = os.path.join(args.out, "checkpoint"), os.path.join(args.out, "anchors.pt")
    if not os.path.isfile(os.path.join(ckpt, "state.json")):
        pl.fail(f"{ckpt}: nothing to resume")
    try:
        state = json.load(open(os.path.join(ckpt, "state.json")))
        anchors = torch.load(anchors_path, weights_only=True)
    except FileNotFoundError:
        pl.fail(f"{anchors_path}: missing, so the run in {args.out} cannot be resumed")
    except Exception as e:
        pl.fail(f"{args.out}: damaged checkpoint or anchors ({type(e).__name__}); start again with --overwrite")
    changed = [k for k, v in state.get("config", {}).items() if k in RESUME_KEYS and getattr(args, k) != v]
    if changed:
        k = changed[0]
        pl.fail(f"--resume with a different --{k.replace('_', '-')} than the run in {args.out} "
                f"({getattr(args, k)!r} vs {state['config'][k]!r})")
    if anchors.get("z0") is None and any(alpha_at(e, args) > 0 for e in range(args.epochs)):
        pl.fail(f"the run in {args.out} was plain IFT (no anchors z0 recorded); it cannot be resumed with alpha > 0")
    return state, anchors


def restore(path, model, opt):
    """Load a checkpoint's trainable weights and optimizer state into this run."""
    from safetensors.torch import load_file

    try:
        weights = load_file(os.path.join(path, "trainable.safetensors"))
        opt_state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    except Exception as e:
        pl.fail(f"{path}: damaged checkpoint ({type(e).__name__}); start again with --overwrite")
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        pl.fail(f"{path}: checkpoint does not match this run's trainable parameters (missing {sorted(missing)[0]})")
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in weights:
                v.copy_(weights[k])
    opt.load_state_dict(opt_state)


# ============================================================================ main
def check_args(args):
    """Every flag that needs no model, checked before any work."""
    pl.check_model_args(args)
    for flag, v, low in (("--epochs", args.epochs, 1), ("--grad-accum", args.grad_accum, 1),
                         ("--ce-chunk", args.ce_chunk, 0),
                         ("--max-length", args.max_length, 2), ("--lora-r", args.lora_r, 1)):
        if v < low:
            pl.fail(f"{flag} {v}: must be at least {low}")
    for flag, v in (("--limit", args.limit), ("--safety-n", args.safety_n), ("--max-steps", args.max_steps)):
        if v is not None and v < 1:
            pl.fail(f"{flag} {v}: must be at least 1 (leave it out for no limit)")
    if not args.lr > 0:
        pl.fail(f"--lr {args.lr}: must be positive")
    if not 0 <= args.warmup_ratio < 1:
        pl.fail(f"--warmup-ratio {args.warmup_ratio}: must be in [0, 1)")
    if args.alpha < 0 or args.warmup_alpha < 0:
        pl.fail("--alpha and --warmup-alpha must not be negative")
    if not 0 <= args.warmup_epochs <= args.epochs:
        pl.fail(f"--warmup-epochs {args.warmup_epochs}: must be between 0 and --epochs {args.epochs}")
    if args.full and args.save_merged:
        pl.fail("--save-merged merges a LoRA adapter; --full already writes the whole model to --out/model")
    if args.full and args.load_in_4bit:
        pl.fail("--full cannot train a 4-bit model; use LoRA (QLoRA) with --load-in-4bit")
    if args.resume and args.overwrite:
        pl.fail("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if args.layers != "all" and any(x.strip() == "0" for x in args.layers.split(",")):
        pl.fail("--layers: layer 0 cannot be constrained (its input is the embedding, whose r_0 is 0)")


def constrained_layers(spec, n_layers):
    """--layers: 'all' is 1..L-1. [choice] The paper constrains "all layers"; the input to layer 0 is the token
    embedding, and every chat-formatted prompt ends in the same template token, so its harmful - harmless difference
    is 0."""
    if spec == "all":
        return list(range(1, n_layers))
    try:
        layers = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        pl.fail(f"--layers {spec!r}: expected 'all' or comma-separated layer indices")
    bad = [l for l in layers if not 1 <= l < n_layers]
    if bad:
        pl.fail(f"--layers: layer {bad[0]} is out of range for a model with {n_layers} layers (1..{n_layers - 1}; "
                "the input to layer 0 is the embedding, whose r_0 is 0)")
    return layers


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.model, args)
    args.model = args.model or pl.default_model()
    check_args(args)
    outputs = ("procon.json", "drift.json", "drift.png", "model" if args.full else "adapter")
    pl.check_out(args.out)
    resumed = read_resume(args) if args.resume else None  # every resume check, before any work
    if not args.resume:
        pl.prepare_out(args.out, outputs + ("checkpoint", "anchors.pt"), args.overwrite)
    pl.seed_everything(args.seed)
    t0 = time.time()

    # 1. data: benign pairs, safety samples (ProCon_safe), held-out pairs, the prompts of the r-directions and drift
    pairs = read_pairs(args.data)[:args.limit]
    safety = read_pairs(args.safety_data, pl.read_prompts(args.refusals), args.seed)[:args.safety_n] \
        if args.safety_data else []
    eval_pairs = read_pairs(args.eval_data) if args.eval_data else []
    prompts = {k: pl.read_prompts(getattr(args, k)) for k in ("harmful", "harmless", "probe_harmful", "probe_harmless")}

    # 2. model, constrained layers, training examples in fixed batches
    model, tok = pl.load(args)
    keep_4bit_trainable(model)
    n_layers, device = pl.text_config(model).num_hidden_layers, pl.model_device(model)
    layers = constrained_layers(args.layers, n_layers)
    examples = [encode_pair(tok, p, a, args.max_length, args.positions) for p, a in pairs]
    examples += [encode_pair(tok, p, a, args.max_length, args.positions, ce=args.safety_role == "ce+constraint")
                 for p, a in safety]
    pl.check_context(model, [len(e[0]) for e in examples], what="training pairs (after --max-length)")
    if not any(l != -100 for e in examples for l in e[1]):
        pl.fail(f"--max-length {args.max_length} leaves no response tokens in any training pair")
    batches = fixed_batches(examples, args.batch_size, args.grad_accum, args.seed)
    if args.ce_chunk:
        check_ce_chunk(model, collate([examples[i] for i in batches[0][0]], tok.pad_token_id), pl.model_device(model),
                       args.ce_chunk)
    eval_examples = [encode_pair(tok, p, a, args.max_length) for p, a in eval_pairs]

    # 3. the r-directions of the initial model, frozen, and the probe direction that drift is measured against
    r = resumed[1]["r"] if resumed else r_directions(model, tok, prompts["harmful"], prompts["harmless"],
                                                     args.batch_size, "r-directions")
    r_probe0 = r_directions(model, tok, prompts["probe_harmful"], prompts["probe_harmless"], args.batch_size, "probe")
    r = r.to(device)

    # 4. the anchors z0 = r_l . x_{l,j} under the initial weights: one pass before training, same batches
    anchors = resumed[1] if resumed else compute_anchors(model, examples, batches, r, layers, args, tok.pad_token_id)
    if not resumed:
        pl.save_torch(os.path.join(args.out, "anchors.pt"), anchors)
    scale = anchors["rms"].to(device) if args.scale == "anchor-rms" and anchors.get("rms") is not None else None

    # 5. trainable parameters (LoRA or all), AdamW, and the checkpoint a resumed run continues from
    model, params = make_trainable(model, args)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    log = resumed[0]["log"] if resumed else {"steps": [], "epochs": [], "runs": []}
    log["runs"].append({"command": pl.metadata(args)["command"], "from_step": len(log["steps"]),
                        "alpha": args.alpha, "warmup_alpha": args.warmup_alpha, "epochs": args.epochs})
    if resumed:
        restore(os.path.join(args.out, "checkpoint"), model, opt)
        print(f"resuming after step {len(log['steps'])}")

    # 6. the loop
    opt = train(model, opt, params, batches, examples, anchors["z0"], r, layers, scale, args, log, device,
                tok, prompts, r_probe0, eval_examples, n_layers)

    # 7. outputs: the adapter or full model, the log, drift per layer and epoch, the merged model if asked
    write_outputs(args, model, tok, log, layers, pairs, safety, n_layers, t0, device)


def compute_anchors(model, examples, batches, r, layers, args, pad_id):
    """z0 for every example (its constrained positions), and the RMS of the anchors per layer (--scale anchor-rms)."""
    if not any(alpha_at(e, args) > 0 for e in range(args.epochs)):  # plain IFT: no anchors needed
        return {"r": r.cpu(), "z0": None, "rms": None, "layers": layers}
    z0 = [None] * len(examples)
    with torch.no_grad():
        for idx in tqdm([m for b in batches for m in b], desc="anchors z0", leave=False):
            _, hs, cmask = forward(model, collate([examples[i] for i in idx], pad_id), pl.model_device(model))
            z = projections(hs, cmask, r, layers).cpu()
            for i, part in zip(idx, torch.split(z, cmask.sum(1).tolist(), dim=1)):
                z0[i] = part.clone()
    rms = torch.cat(z0, dim=1).pow(2).mean(1).sqrt().clamp(min=1e-6)
    return {"r": r.cpu(), "z0": z0, "rms": rms, "layers": layers}


def train(model, opt, params, batches, examples, z0, r, layers, scale, args, log, device, tok, prompts, r_probe0,
          eval_examples, n_layers):
    """Epochs of optimizer steps over the fixed batches (their order shuffled per epoch with the seed); at the end of
    each epoch: held-out CE, drift of the re-extracted probe direction, a checkpoint. Resumes at the step after the
    last one in the log. [choice] The model stays in eval mode (dropout off; the paper does not say, and SmolLM2,
    Llama and Qwen2 have dropout 0): with the same weights and the same batch, z = z0 exactly at step 0."""
    pad_id, per_epoch = tok.pad_token_id, len(batches)
    total = min(args.epochs * per_epoch, args.max_steps or args.epochs * per_epoch)
    done = len(log["steps"])
    if done >= total:
        pl.fail(f"the run in {args.out} has finished its {done} steps; raise --epochs or --max-steps to continue")
    for epoch in range(done // per_epoch, math.ceil(total / per_epoch)):
        alpha = alpha_at(epoch, args)
        if (args.reset_optimizer and args.warmup_epochs and epoch == args.warmup_epochs and done % per_epoch == 0
                and alpha != args.warmup_alpha):
            # [choice] The paper is silent; by default one AdamW runs throughout, as in a plain training loop. But its
            # second moments (beta2 = 0.999: a memory of ~1000 steps) still hold the warm-up constraint's far larger
            # gradients and shrink every CE step after it; on short runs that stalls learning (results/procon.md).
            opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        order = list(range(per_epoch))
        random.Random(args.seed * 1000 + epoch).shuffle(order)  # batch order per epoch: resumable, reproducible
        bar = tqdm(order[done - epoch * per_epoch:min(per_epoch, total - epoch * per_epoch)],
                   desc=f"epoch {epoch + 1}/{args.epochs} alpha={alpha:g}")
        for b in bar:
            t_step = time.time()
            micros = [collate([examples[i] for i in m], pad_id) for m in batches[b]]
            norm = {"tokens": sum(int((mb[2][:, 1:] != -100).sum()) for mb in micros),
                    "samples": sum(len(m) for m in batches[b]), "positions": sum(int(mb[3].sum()) for mb in micros)}
            for g in opt.param_groups:
                g["lr"] = lr_at(done, total, args)
            opt.zero_grad(set_to_none=True)
            ce_step, reg_step = 0.0, 0.0
            for m, micro in zip(batches[b], micros):
                z0_micro = torch.cat([z0[i] for i in m], dim=1) if alpha != 0 else None
                loss, ce, reg = training_loss(model, micro, device, r, z0_micro, alpha, layers, args, norm, scale)
                if not torch.isfinite(loss):
                    pl.fail(f"loss is {loss.item()} at epoch {epoch + 1} step {done + 1}; the last good checkpoint in "
                            f"{args.out}/checkpoint is kept (try a lower --lr or --warmup-alpha)")
                loss.backward()
                ce_step, reg_step = ce_step + ce.item(), reg_step + reg.item()
            opt.step()
            done += 1
            log["steps"].append({"epoch": epoch + 1, "ce": ce_step, "constraint": reg_step, "alpha": alpha,
                                 "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t_step, 4)})
            bar.set_postfix(ce=f"{ce_step:.3f}", con=f"{reg_step:.3f}")
        end_of_epoch(model, tok, epoch, alpha, log, eval_examples, prompts, r_probe0, n_layers, args, device)
        save_checkpoint(os.path.join(args.out, "checkpoint"), model, opt,
                        {"log": log, "config": {k: getattr(args, k) for k in RESUME_KEYS}})
    return opt


def end_of_epoch(model, tok, epoch, alpha, log, eval_examples, prompts, r_probe0, n_layers, args, device):
    """Held-out CE and the drift of the re-extracted probe direction, logged for the epoch."""
    eval_ce = evaluate_ce(model, eval_examples, args.batch_size, tok.pad_token_id, device) if eval_examples else None
    r_probe = r_directions(model, tok, prompts["probe_harmful"], prompts["probe_harmless"], args.batch_size,
                           "drift probe")
    steps = [s for s in log["steps"] if s["epoch"] == epoch + 1]
    log["epochs"] = [e for e in log["epochs"] if e["epoch"] != epoch + 1] + [{
        "epoch": epoch + 1, "alpha": alpha, "steps": len(steps), "ce": sum(s["ce"] for s in steps) / len(steps),
        "constraint": sum(s["constraint"] for s in steps) / len(steps), "eval_ce": eval_ce,
        "drift": drift(r_probe0, r_probe, range(1, n_layers))}]


@torch.no_grad()
def evaluate_ce(model, examples, batch_size, pad_id, device):
    """Token-weighted CE on response tokens of held-out pairs."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id)
        ce_sum, _, _ = forward(model, batch, device, hidden=False)
        total += ce_sum.item()
        count += int((batch[2][:, 1:] != -100).sum())
    return total / max(count, 1)


def write_outputs(args, model, tok, log, layers, pairs, safety, n_layers, t0, device):
    """The adapter (or full model), procon.json, drift.json and drift.png; the merged model with --save-merged."""
    name = "model" if args.full else "adapter"
    model.save_pretrained(os.path.join(args.out, name))
    if args.full:
        tok.save_pretrained(os.path.join(args.out, name))
    meta = pl.metadata(args, [args.data, args.safety_data, args.eval_data, args.harmful, args.harmless,
                              args.probe_harmful, args.probe_harmless, args.refusals])
    drift_log = {str(e["epoch"]): e["drift"] for e in log["epochs"]}
    pl.save_json(os.path.join(args.out, "procon.json"), {
        "model": args.model, "layers": layers, "n_train": len(pairs), "n_safety": len(safety), "seed": args.seed,
        "seconds": round(time.time() - t0, 1), "peak_memory_mib": pl.peak_memory_mib(device), **log, **meta})
    pl.save_json(os.path.join(args.out, "drift.json"), {"model": args.model, "cosine_to_initial": drift_log,
                                                       "layers": list(range(1, n_layers)), **meta})
    plot_drift(os.path.join(args.out, "drift.png"), drift_log, args.model)
    print(f"\n{'epoch':>5} {'alpha':>6} {'CE':>8} {'constraint':>11} {'held-out CE':>12} {'drift cos (deep half)':>22}")
    for e in sorted(log["epochs"], key=lambda e: e["epoch"]):
        deep = [v for l, v in e["drift"].items() if int(l) >= n_layers // 2]
        ev = f"{e['eval_ce']:.4f}" if e["eval_ce"] is not None else "-"
        print(f"{e['epoch']:>5} {e['alpha']:>6g} {e['ce']:>8.4f} {e['constraint']:>11.4f} {ev:>12} "
              f"{sum(deep) / len(deep):>22.4f}")
    print(f"\nwrote {args.out}/{name}, procon.json, drift.json, drift.png in {time.time() - t0:.0f}s "
          f"(peak memory {pl.peak_memory_mib(device):.0f} MiB)")
    if args.save_merged and not args.full:
        del model
        merge(os.path.join(args.out, "adapter"), os.path.join(args.out, "merged"), args.model, args)


def merge(adapter_dir, out, base, args):
    """The base model, reloaded unquantised (merging into a 4-bit base loses quality), with the adapter merged in:
    safetensors and tokenizer in `out`."""
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        pl.fail(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    if os.path.exists(os.path.join(out, "config.json")) and not args.overwrite:
        pl.fail(f"{out}/config.json exists; pass --overwrite to replace it or choose another --out")
    pl.check_out(out)
    base = base or json.load(open(os.path.join(adapter_dir, "adapter_config.json"))).get("base_model_name_or_path")
    from peft import PeftModel

    model, tok = pl.load_model(base, False, args.chat_template, args.trust_remote_code, args.device)
    try:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        pl.fail(f"{adapter_dir}: could not apply the adapter to {base} ({str(e).strip().splitlines()[0]})")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {base} with {adapter_dir} merged to {out}")
    return model


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
    pl.run_main(main)
