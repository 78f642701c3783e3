"""inference.py: what a model computes, read and steered (black boxes, shared by every script).

Activations: the residual stream at the input of every layer, at the prompts' last tokens (capture). Hooks: forward
hooks held for a with block (hooks), the writes of each block to the residual stream. Generation and scoring: batched
greedy answers (generate), next-token log-probabilities (last_logits); activations that overflow stop the run.

Layers, in every script and every output: layer l is decoder block l (0-based). The input of layer l is the residual
stream entering it (Arditi's resid_pre, transformers' hidden_states[l]; the input of layer 0 is the embeddings); the
output of layer l is the stream leaving it, which is the input of layer l + 1. directions.py and procon.py read inputs,
actor.py the output of the layer it trains; each output's metadata says which.
"""
import contextlib

import torch
from tqdm import tqdm

import chat
import cli
import loading


@torch.no_grad()
def capture(model, tokenizer, prompts, positions=1, batch_size=16, desc="activations"):
    """Residual stream at the last `positions` tokens of each chat-formatted prompt, at every layer boundary.

    Returns a float32 tensor [n_prompts, n_layers + 1, positions, d]: index l is the input of layer l (index 0: the
    embeddings), index n_layers the output of the last layer; so the output of layer l is index l + 1.
    """
    layers = loading.decoder_layers(model)
    texts = chat.format_chat(tokenizer, prompts)
    shortest = min(chat.token_lengths(tokenizer, texts))
    if positions > shortest:
        cli.fail(f"--positions {positions}: the shortest chat-formatted prompt has {shortest} tokens")
    out = torch.zeros(len(texts), len(layers) + 1, positions, loading.text_config(model).hidden_size)
    store = {}

    def grab(i):
        def pre(module, args, kwargs):
            store[i] = hidden_of(args, kwargs)[:, -positions:, :].float().cpu()
        return pre

    def grab_last(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        store[len(layers)] = h[:, -positions:, :].float().cpu()

    pairs = [(layer, "pre", grab(i)) for i, layer in enumerate(layers)] + [(layers[-1], "post", grab_last)]
    with hooks(pairs):
        for idx in tqdm(chat.length_batches(tokenizer, texts, batch_size), desc=desc, leave=False):
            enc = chat.tokenize(tokenizer, [texts[i] for i in idx], loading.model_device(model))
            model(**enc, use_cache=False)
            out[idx] = torch.stack([store[l] for l in range(len(layers) + 1)], dim=1)
    return out


def hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args, kwargs, h):
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@contextlib.contextmanager
def hooks(pairs):
    """Register (module, kind, fn) hooks for the duration of a with block; kind is 'pre' or 'post'."""
    handles = []
    try:
        for module, kind, fn in pairs:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


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


def check_activations(h, what):
    """Residual-stream activations a model can go on with: their mean square over the hidden size (what every RMS or
    layer norm computes, in fp32) is finite. Beyond about 1e19 it overflows, and a norm then outputs zeros or NaN: the
    model's answers would be empty or arbitrary, not wrong in a way a judge can see. Else check_finite stops the run."""
    cli.check_finite(h.float().pow(2).mean(-1), what)
    return h


def check_overflow(model, desc):
    """A hook on the output of the model's last layer: activations that overflow stop the run (check_activations)."""
    def post(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        check_activations(h, f"the mean square of the activations ({desc})")
    return [(loading.decoder_layers(model)[-1], "post", post)]


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=16, desc="generating", on_batch=None,
             formatted=False):
    """Batched greedy decoding with left padding, prompts sorted by length; returns responses in prompt order.
    Activations that overflow stop the run (check_overflow), never decode into tokens.

    Prompts go through the chat template, unless formatted=True (texts already in their final form).
    on_batch(indices, responses) is called after each batch, so a caller can save progress as it goes.
    """
    texts = prompts if formatted else chat.format_chat(tokenizer, prompts)
    responses = [None] * len(texts)
    bar = tqdm(total=len(texts), desc=desc, unit="prompt", leave=False)
    for idx in chat.length_batches(tokenizer, texts, batch_size):
        enc = chat.tokenize(tokenizer, [texts[i] for i in idx], loading.model_device(model))
        with hooks(check_overflow(model, desc)):
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        for i, r in zip(idx, decoded):
            responses[i] = r
        if on_batch:
            on_batch(idx, decoded)
        bar.update(len(idx))
    bar.close()
    return responses


@torch.no_grad()
def last_logits(model, tokenizer, prompts, batch_size=16, hook_pairs=(), desc="scoring"):
    """Next-token log-probabilities at the end of each chat-formatted prompt (fp32, [n, vocab]); activations that
    overflow, or NaN or infinite logits, stop the run (check_overflow, check_finite)."""
    texts = chat.format_chat(tokenizer, prompts)
    out = [None] * len(texts)
    with hooks(list(hook_pairs) + check_overflow(model, desc)):
        for idx in tqdm(chat.length_batches(tokenizer, texts, batch_size), desc=desc, leave=False):
            enc = chat.tokenize(tokenizer, [texts[i] for i in idx], loading.model_device(model))
            logits = cli.check_finite(model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float(),
                                  f"the logits ({desc})", neg_inf=True)
            for i, row in zip(idx, torch.log_softmax(logits, -1).cpu()):
                out[i] = row
    return torch.stack(out)
