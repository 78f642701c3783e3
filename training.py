"""training.py: the fine-tuning machinery that procon.py and the benches share and no paper defines.

Instruction-response pairs (read, chat-formatted, loss on the response tokens only, padded into batches); the
trainable parameters (LoRA on the attention projections of any architecture, QLoRA on a 4-bit model, or every weight),
gradient checkpointing; the forward pass that gives the summed cross-entropy of the response tokens (with the logits
made only where a loss is taken, or a chunk at a time) and, for a constraint, the hidden states of the same pass; and
the held-out cross-entropy.
"""
import json
import math
import os
import random

import torch
import torch.nn.functional as F

import plumbing as pl
import rundir


# ============================================================================ instruction-response pairs
def read_pairs(path, refusals=None, seed=0):
    """(prompt, response) pairs; a prompt-only file gets a refusal from `refusals` (seeded choice) when given."""
    rows = pl.read_records(path)
    rng = random.Random(seed)
    pairs = []
    for i, r in enumerate(rows):
        text = lambda k: pl.text_of(r[k], path, i + 1, k)  # noqa: E731  (a list or an object is an error)
        if r.get("instruction") is not None and r.get("output") is not None:  # Alpaca
            prompt = text("instruction") + ("\n\n" + text("input") if str(r.get("input") or "").strip() else "")
            pairs.append((prompt, text("output")))
        elif r.get("prompt") is not None and (r.get("response") or r.get("completion")) is not None:
            pairs.append((text("prompt"), text("response" if r.get("response") else "completion")))
        elif r.get("question") is not None and r.get("answer") is not None:  # GSM8K
            pairs.append((text("question"), text("answer")))
        elif refusals:
            pairs.append((next((text(c) for c in pl.PROMPT_COLUMNS if r.get(c) is not None), ""), rng.choice(refusals)))
    pairs = [(p, a) for p, a in pairs if p and a]
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


def check_loss_tokens(examples, max_length, what):
    """Pairs cut to --max-length must keep some response tokens to take a loss on (else CE would read 0)."""
    if not any(l != -100 for e in examples for l in e[1]):
        pl.fail(f"--max-length {max_length} leaves no response tokens in any of the {what}")


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


# ============================================================================ the forward pass and its loss
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
        # [choice] lora_dropout 0: without dropout the step-0 constraint of procon.py is exactly 0
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


def fixed_batches(examples, batch_size, grad_accum, seed):
    """Optimizer batches of batch_size * grad_accum samples of similar length, composed once (every epoch, and a pass
    before training, see the same ones), each split into grad_accum micro-batches: 2 x 4 holds what 1 x 8 holds."""
    size = batch_size * grad_accum
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), i))
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    random.Random(seed).shuffle(batches)
    return [[b[i:i + batch_size] for i in range(0, len(b), batch_size)] for b in batches]


def lr_at(step, total, lr, warmup_ratio=0.0, schedule="constant"):
    """Learning rate of optimizer step `step` of `total`: a linear warm-up, then constant, linear or cosine decay."""
    warm = int(total * warmup_ratio)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    return lr * {"constant": 1.0, "linear": 1.0 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t))}[schedule]


# ============================================================================ checkpoints (in a run's folder)
def trainable_state(model, step):
    """The trainable weights, on the CPU; weights that are no longer finite stop the run before anything is written."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}
    if not all(torch.isfinite(v).all() for v in state.values()):
        pl.fail(f"the weights are no longer finite after step {step}; try a lower --lr (nothing was written)")
    return state


def save_checkpoint(folder, model, opt, step, state):
    """The trainable weights (finite, or the run stops), the optimizer's state, the step and `state` (a JSON dict)."""
    from safetensors.torch import save_file

    save_file(trainable_state(model, step), os.path.join(folder, "trainable.safetensors"))
    torch.save(opt.state_dict(), os.path.join(folder, "optimizer.pt"))
    pl.save_json(os.path.join(folder, "state.json"), {"step": step, **state})


def restore(work, model, opt):
    """Load the last whole checkpoint of a run's folder into the model and optimizer; returns its state.json (None
    where there is no checkpoint yet: training starts from the first step)."""
    from safetensors.torch import load_file

    found = rundir.last_checkpoint(work)
    if found is None:
        return None
    try:
        weights = load_file(os.path.join(found[1], "trainable.safetensors"))
        opt.load_state_dict(torch.load(os.path.join(found[1], "optimizer.pt"), weights_only=True))
        state = json.load(open(os.path.join(found[1], "state.json"), encoding="utf-8"))
        with torch.no_grad():
            for k, v in model.named_parameters():
                if v.requires_grad:
                    v.copy_(weights[k])
    except Exception as e:
        pl.fail(f"{found[1]}: damaged checkpoint ({type(e).__name__}: {str(e)[:80]}); start again with --overwrite")
    return state
