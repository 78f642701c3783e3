"""training.py: fine-tuning machinery no paper defines (a black box to procon.py): pair files in, trainable
parameters set up, checkpoints written and read.

Instruction-response pair files (Alpaca, prompt/response, GSM8K, or prompts answered with refusals); the trainable
parameters (LoRA on the attention projections of any architecture, QLoRA on a 4-bit model, or every weight) and
gradient checkpointing; a training checkpoint's files (trainable weights, optimizer, state). How a pair is encoded, the
forward pass, the loss and the loop are procon.py's.
"""
import json
import os
import random

import torch

import plumbing as pl
import rundir


# ============================================================================ pair files
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


def add_trainable_args(g, memory):
    """The flags of make_trainable: --full or LoRA (its rank, alpha and target modules) in group g, gradient
    checkpointing in the memory group."""
    memory.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each layer in backward instead of keeping its activations (less memory)")
    g.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA")
    g.add_argument("--lora-r", type=pl.count(1), default=8, help="LoRA rank ([choice] 8)")
    g.add_argument("--lora-alpha", type=pl.number(above=0), default=16, help="LoRA alpha ([choice] 16)")
    g.add_argument("--lora-targets", default="auto", help="modules that get LoRA adapters: 'auto' (the attention "
                   "projections of this model, fused or not), 'all-linear', or a list like q_proj,v_proj")


@torch.no_grad()
def check_ce_chunk(forward, model, batch, device, ce_chunk):
    """--ce-chunk computes logits itself (forward(..., ce_chunk)); on the first batch it must give the model's own CE,
    or the run stops."""
    plain, chunked = forward(model, batch, device, False)[0], forward(model, batch, device, False, ce_chunk)[0]
    if not torch.isclose(plain, chunked, rtol=1e-4, atol=1e-3):
        pl.fail(f"--ce-chunk: this model's logits are not its output head on the last hidden state (CE "
                f"{plain.item():.4f} vs {chunked.item():.4f}); leave --ce-chunk out")


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


def resumed(work, name, out):
    """A torch file an unfinished run saved in its work folder (read on --resume), or None where there is none."""
    path = os.path.join(work, name)
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        pl.fail(f"{out}: the unfinished run's {name} is damaged ({type(e).__name__}); start again with --overwrite")


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
