"""training.py: fine-tuning machinery no paper defines (a black box to procon.py): pair files in, trainable
parameters set up, checkpoints written and read, several processes kept in step.

Instruction-response pair files (Alpaca, prompt/response, GSM8K, or prompts answered with refusals); the trainable
parameters (LoRA on the attention projections of any architecture, QLoRA on a 4-bit model, or every weight) and
gradient checkpointing; a training checkpoint's files (trainable weights, optimizer, state); data parallel training
under torchrun or accelerate launch (one process per device; the sum of the processes' gradients is the one-process
step's, and rank 0 alone writes); procon.py's run around its method: its data and run flags, the checks of its flags
and encoded pairs, its outputs. How a pair is encoded, the forward pass, the loss and the loop are procon.py's.
"""
import atexit
import contextlib
import json
import os
import random
import statistics
import sys
import time

import torch

import artifacts
import plumbing as pl
import rundir

RANK, WORLD = 0, int(os.environ.get("WORLD_SIZE", 1))  # data parallel: this process's rank, the number of processes


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
        elif r.get("prompt") is not None and (r.get("response"), r.get("completion")) != (None, None):
            pairs.append((text("prompt"), text("response" if r.get("response") or r.get("completion") is None
                                               else "completion")))
        elif r.get("question") is not None and r.get("answer") is not None:  # GSM8K
            pairs.append((text("question"), text("answer")))
        elif refusals and any(r.get(c) is not None for c in pl.PROMPT_COLUMNS):
            pairs.append((next(text(c) for c in pl.PROMPT_COLUMNS if r.get(c) is not None), rng.choice(refusals)))
        else:  # a row no format reads would silently add nothing
            pl.fail(f"{path}: row {i + 1} is not usable: expected " + (", ".join(pl.PROMPT_COLUMNS) if refusals else
                    "instruction/output, prompt/response or question/answer") + f", not empty (it has {', '.join(r)})")
        if not all(pairs[-1]):  # an empty prompt or answer, dropped, would change the data without a word
            pl.fail(f"{path}: row {i + 1} has an empty {'prompt' if not pairs[-1][0] else 'response'}")
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
    """LoRA adapters on the chosen targets (peft), or every weight with --full; under data parallel every process
    starts from rank 0's weights. Returns (model, parameters)."""
    if pl.offloaded(model):
        pl.fail("training goes through every layer, and some of this model's weights are offloaded (to the CPU or the "
                "disk); give --max-memory room for all of them on the GPUs, or use --load-in-4bit")
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
    params = [p for p in model.parameters() if p.requires_grad]
    if WORLD > 1:
        for p in params:
            torch.distributed.broadcast(p.data, 0)
    return model, params


# ============================================================================ checkpoints (in a run's folder)
def trainable_state(model, step):
    """The trainable weights, on the CPU; weights that are no longer finite stop the run before anything is written."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}
    for k, v in state.items():
        pl.check_finite(v, f"the trained weights after step {step}", " (they were not written)")
    return state


def save_checkpoint(folder, model, opt, step, state):
    """The trainable weights (finite, or the run stops), the optimizer's state, the step and `state` (a JSON dict)."""
    from safetensors.torch import save_file

    save_file(trainable_state(model, step), os.path.join(folder, "trainable.safetensors"))
    torch.save(opt.state_dict(), os.path.join(folder, "optimizer.pt"))
    pl.save_json(os.path.join(folder, "state.json"), {"step": step, **state})


def read_saved(work, name, out):
    """A torch file an unfinished run saved in its work folder (read on --resume), or None where there is none."""
    path = os.path.join(work, name)
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:
        pl.fail(f"{out}: the unfinished run's {name} is damaged ({type(e).__name__}); start again with --overwrite")
    check_whole(saved, f"{out}: the unfinished run's {name}")
    return saved


def check_whole(tensors, what, like=None):
    """Every floating-point tensor in `tensors` (a dict, list or tensor, nested) finite, and, where `like` gives the
    model's own tensors by name, of their shape and a floating-point dtype: a resume never trains on from NaN."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors if isinstance(tensors, (list, tuple))
                                                                        else [tensors])
    for k, v in items:
        if isinstance(v, (dict, list, tuple)):
            check_whole(v, what)
        elif torch.is_tensor(v):
            if like is not None and (not v.is_floating_point() or k not in like or v.shape != like[k].shape):
                pl.fail(f"{what}: {k} is not the model's ({v.dtype}, shape {list(v.shape)}); start again with "
                        "--overwrite")
            if v.is_floating_point() and not torch.isfinite(v).all():
                pl.fail(f"{what}: {k} holds NaN or infinite values; start again with --overwrite")


def checkpoint(work, step, model, opt, state):
    """A checkpoint of the run in `work` (rundir.save_checkpoint: whole or not at all), written by rank 0 alone."""
    if RANK == 0:
        rundir.save_checkpoint(work, step, lambda folder: save_checkpoint(folder, model, opt, step, state))


def read_checkpoint(work):
    """(weights, optimizer state, state.json) of the last whole checkpoint in a run's folder, or None."""
    from safetensors.torch import load_file

    found = rundir.last_checkpoint(work)
    if found is None:
        return None
    try:
        return (load_file(os.path.join(found[1], "trainable.safetensors")),
                torch.load(os.path.join(found[1], "optimizer.pt"), weights_only=True, map_location="cpu"),
                json.load(open(os.path.join(found[1], "state.json"), encoding="utf-8")))
    except Exception as e:
        pl.fail(f"{found[1]}: damaged checkpoint ({type(e).__name__}: {str(e)[:80]}); start again with --overwrite")


def restore(work, model, opt):
    """Load the last whole checkpoint of a run's folder into the model and optimizer; returns its state.json (None
    where there is no checkpoint yet: training starts from the first step). Rank 0 reads it and sends it to the
    other processes."""
    found = from_rank0(lambda: read_checkpoint(work))
    if found is None:
        return None
    weights, opt_state, state = found
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    check_whole(weights, f"{work}: the checkpoint's weights", params)
    check_whole(opt_state.get("state", {}), f"{work}: the checkpoint's optimizer state")
    try:
        opt.load_state_dict(opt_state)
        with torch.no_grad():
            for k, v in model.named_parameters():
                if v.requires_grad:
                    v.copy_(weights[k])
    except Exception as e:
        pl.fail(f"{work}: damaged checkpoint ({type(e).__name__}: {str(e)[:80]}); start again with --overwrite")
    print(f"resuming after step {state['step']}")
    return state


# ============================================================================ data parallel (torchrun, accelerate)
# One process per device, each with a whole model. Each optimizer step's micro-batches (--grad-accum of them) are
# dealt out to the processes, every WORLD-th to each; after the step's backward passes the gradients are summed over
# the processes (one all-reduce, SUM, per trainable tensor) and every process takes the same AdamW step. procon.step
# normalises each micro-batch's loss by the whole step's tokens and samples, so the sum is the one-process step's
# gradient exactly (up to float summation order). [choice] An explicit all-reduce after backward rather than
# torch's DistributedDataParallel: exact, a few lines, the same for LoRA and --full; DDP would overlap the
# communication with backward (faster across many GPUs). Rank 0 alone writes (the run's folder, lock, checkpoints,
# outputs) and reads what a resume continues from; the other processes get it from rank 0.


def init_distributed(args):
    """Under torchrun or accelerate launch (WORLD_SIZE > 1): checked, then the process group joined (nccl on GPUs, gloo
    on the CPU), this process's GPU cuda:LOCAL_RANK, the model (a .gguf converted once, by rank 0), the other ranks'
    stdout and progress bars silenced. Returns this process's Parallel (in one process too)."""
    global RANK
    if WORLD == 1:
        return Parallel()
    if args.device_map:
        pl.fail("--device-map spreads one model over devices; under torchrun each process holds a whole model")
    if args.device and args.device not in ("cuda", "cpu"):
        pl.fail(f"--device {args.device}: under torchrun each process takes its own GPU (cuda:LOCAL_RANK); pass cuda "
                "or cpu")
    if args.grad_accum % WORLD:
        pl.fail(f"--grad-accum {args.grad_accum}: each of the {WORLD} processes takes the same share of a step's "
                f"micro-batches; use a multiple of {WORLD}")
    cuda = pl.check_device(args.device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    atexit.register(torch.distributed.destroy_process_group)  # a process that stops early leaves the group cleanly
    RANK = torch.distributed.get_rank()
    from_rank0(lambda: pl.resolve_model(args.model))
    if RANK > 0:  # one progress report, rank 0's; errors still reach stderr
        import functools

        import tqdm

        sys.stdout = open(os.devnull, "w")
        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)
    return Parallel()


def from_rank0(fn):
    """fn() run by rank 0 alone, its result sent to every process (pickled); fn() itself in one process."""
    if WORLD == 1:
        return fn()
    box = [fn() if RANK == 0 else None]
    torch.distributed.broadcast_object_list(box, 0)
    return box[0]


class Parallel:
    """What a training step asks of data parallel: its process's share of the step's micro-batches, and the sums over
    the processes. In one process: every micro-batch, and the sums as they are."""

    def share(self, micro_batches):
        """This process's share of one step's micro-batches: every WORLD-th, from its rank."""
        return list(micro_batches)[RANK::WORLD]

    def sum_gradients(self, params, *numbers):
        """Every gradient, and `numbers`, summed over the processes (a process without micro-batches adds zeros)."""
        if WORLD > 1:
            for p in params:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                torch.distributed.all_reduce(p.grad)  # SUM
            torch.distributed.all_reduce(total := torch.tensor(numbers, dtype=torch.float64, device=params[0].device))
            numbers = total.tolist()
        return tuple(numbers)


@contextlib.contextmanager
def run_folder(out, *args, **kwargs):
    """rundir.run_folder, opened by rank 0 alone (its checks, its lock, its commit); the other processes wait for it,
    stop with its error if it fails, and get the path of its work folder, which they never write to."""
    if WORLD == 1:
        with rundir.run_folder(out, *args, **kwargs) as work:
            yield work
        return
    with contextlib.ExitStack() as stack:
        work, error = os.path.join(out, rundir.WORK), None
        if RANK == 0:
            try:
                work = stack.enter_context(rundir.run_folder(out, *args, **kwargs))
            except pl.UserError as e:
                error = str(e)
        error = from_rank0(lambda: error)
        if error:
            pl.fail(error)
        yield work


# ============================================================================ procon.py's run: flags, checks, outputs
# (what surrounds the method in procon.py: its data and run flags, the checks of its flags and encoded pairs, and
# what it writes; the method itself, from the encoding of a pair to the optimizer step, stays in procon.py)
FILES = ("data", "safety_data", "refusals", "eval_data", "eval_refusal", "direction", "harmful", "harmless",
         "probe_harmful", "probe_harmless", "chat_template")  # resume compares their contents
KNOWN = ("procon.json", "drift.json", "drift.png", "adapter", "model", "merged", "checkpoint", "anchors.pt")


def outputs(args):
    """What a run of procon.py writes to --out."""
    return ("procon.json", "drift.json", "drift.png", "model" if args.full else "adapter") + \
        (("merged",) if args.save_merged else ())


def add_data_args(p):
    """The data flags: training pairs, safety samples, held-out pairs, the prompts of r_hat_l and of the drift probe."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=os.path.join(pl.DATA, "instructions.json"),
                   help="instruction-response pairs: JSON/JSONL/CSV with instruction(+input)/output, prompt/response "
                   "or question/answer")
    g.add_argument("--limit", type=pl.count(1), default=None, help="at most N training pairs (a seeded sample)")
    g.add_argument("--safety-data", default=None,
                   help="ProCon_safe: safety samples mixed into training; pairs, or prompts answered with --refusals")
    g.add_argument("--safety-n", type=pl.count(1), default=None, help="use at most N safety samples")
    g.add_argument("--safety-role", choices=("ce+constraint", "constraint"), default="ce+constraint",
                   help="safety samples enter the CE loss and the constraint ([choice]: the abstract's 'broaden the "
                   "data distribution'), or the constraint only (no CE on their refusals)")
    g.add_argument("--refusals", default=os.path.join(pl.DATA, "refusals.json"),
                   help="refusal answers for safety prompts that come without one")
    g.add_argument("--eval-data", default=None, help="held-out pairs: their CE is logged at every evaluation point")
    g.add_argument("--eval-refusal", action="append", default=[], help="prompt file whose refusal rate (the logit "
                   "judge: the first answer token's refusal score above 0) is logged at every evaluation point; "
                   "repeatable")
    g.add_argument("--direction", default=None, help="direction.pt (directions.py) whose refusal tokens the logit "
                   "judge reads (default: the model's tokens for 'I', 'Sorry', 'As', 'Unfortunately')")
    g.add_argument("--eval-every", type=pl.count(0), default=0, help="an evaluation point (held-out CE, drift, "
                   "refusal) before training and every N optimizer steps, besides each epoch's end (0: epochs only)")
    g.add_argument("--harmful", default=os.path.join(pl.DATA, "harmful.json"), help="harmful prompts for r_hat_l")
    g.add_argument("--harmless", default=os.path.join(pl.DATA, "harmless.json"), help="harmless prompts for r_hat_l")
    g.add_argument("--probe-harmful", default=os.path.join(pl.DATA, "probe_harmful.json"),
                   help="fixed harmful probe set for the per-epoch drift of the refusal direction")
    g.add_argument("--probe-harmless", default=os.path.join(pl.DATA, "probe_harmless.json"),
                   help="fixed harmless probe set for the per-epoch drift")


def add_run_args(p, method):
    """procon.py's memory and output flags (and the trainable ones, in its method group)."""
    g = pl.add_memory_args(p, batch_size=8)
    add_trainable_args(method, g)
    g.add_argument("--grad-accum", type=pl.count(1), default=1,
                   help="micro-batches of --batch-size per optimizer step (effective batch: their product; under "
                   "torchrun a multiple of the processes, which share them)")
    g.add_argument("--ce-chunk", type=pl.count(0), default=0, help="make the logits this many tokens at a time, "
                   "recomputed in backward (less memory with a large vocabulary; 0: all at once)")
    g.add_argument("--max-length", type=pl.count(2), default=256, help="truncate chat-formatted pairs to this many "
                   "tokens")
    g = pl.add_out_args(p, "runs/procon", resume="continue the unfinished run in --out from its last checkpoint; every "
                        "setting but --epochs, --max-steps, --save-every and --save-merged must be as it was")
    g.add_argument("--save-every", type=pl.count(0), default=0,
                   help="also checkpoint every N optimizer steps (0: at each epoch's end only)")
    g.add_argument("--save-merged", action="store_true", help="after training, also write the merged model "
                   "(unquantised base + adapter) to --out/merged")
    g.add_argument("--merge", default=None, metavar="ADAPTER_DIR",
                   help="instead of training: write the unquantised base model with this adapter merged to --out")
    g.add_argument("--other-model", action="store_true",
                   help="with --merge: merge an adapter trained on another model than --model")


def check_args(args):
    """What the flags' types cannot check alone, before any work."""
    pl.check_model_args(args)
    if args.warmup_epochs > args.epochs:
        pl.fail(f"--warmup-epochs {args.warmup_epochs}: must be at most --epochs {args.epochs}")
    if args.warmup_epochs and args.warmup_steps:
        pl.fail("--warmup-epochs and --warmup-steps both set the warm-up's length; pass one of them")
    if args.full and args.save_merged:
        pl.fail("--save-merged merges a LoRA adapter; --full already writes the whole model to --out/model")
    if args.full and args.load_in_4bit:
        pl.fail("--full cannot train a 4-bit model; use LoRA (QLoRA) with --load-in-4bit")


def check_examples(model, examples, eval_examples, args, n_safety):
    """Encoded pairs: within the model's context; those that carry CE (the last n_safety carry none with --safety-role
    constraint) and those of --eval-data that --max-length leaves without response tokens add nothing: counted, and
    refused above pl.LOST_LIMIT."""
    pl.check_context(model, [len(e[0]) for e in examples], what="training pairs (after --max-length)")
    n_ce = len(examples) - (n_safety if args.safety_role == "constraint" else 0)
    return [pl.check_lost(sum(all(l == -100 for l in e[1]) for e in found), len(found), what, f"--max-length "
                          f"{args.max_length} leaves no response tokens in", "raise --max-length or shorten them")
            for what, found in (("training pairs", examples[:n_ce]), ("held-out pairs of --eval-data", eval_examples))]


def write_outputs(work, run, pairs, safety, t0):
    """The adapter (or full model), procon.json (the log: steps, epochs, evaluation points), drift.json and drift.png;
    the merged model with --save-merged; the summary table of the evaluation points. Rank 0 alone (data parallel)."""
    if RANK:
        return
    args, log = run.args, run.log
    name = "model" if args.full else "adapter"
    trainable_state(run.model, run.step)  # finite, or nothing is written
    artifacts.save_trained(os.path.join(work, name), run.model, run.tok,
                           None if args.full else artifacts.record(args.model, run.model.config))
    n_layers = pl.text_config(run.model).num_hidden_layers
    meta = pl.metadata(args, [getattr(args, k) for k in FILES])
    log["epochs"] = epoch_summaries(log, len(run.batches))
    drift_log = {str(e["epoch"]): e["drift"] for e in log["epochs"]}
    pl.save_json(os.path.join(work, "procon.json"), {
        "model": args.model, "layers": run.layers, "activation": "input of each constrained layer",
        "n_train": len(pairs), "n_safety": len(safety), "n_cut_by_max_length": dict(zip(("train", "eval"), run.cut)),
        "seed": args.seed, "refusal_tokens": run.refusal_tokens, "seconds": round(time.time() - t0, 1),
        "peak_memory_mib": pl.peak_memory_mib(run.device), **log, **meta})
    pl.save_json(os.path.join(work, "drift.json"), {"model": args.model, "cosine_to_initial": drift_log,
                                                    "layers": list(range(1, n_layers)), **meta})
    pl.line_plot(os.path.join(work, "drift.png"), {f"epoch {e}": ([int(l) for l in c], list(c.values())) for e, c in
                                                   drift_log.items()}, "layer (its input)", "cosine to the initial "
                 "direction", f"refusal-direction drift: {os.path.basename(str(args.model).rstrip('/'))}")
    deep = lambda e: statistics.mean(v for l, v in e["drift"].items() if int(l) >= n_layers // 2)  # noqa: E731
    rows = [[e["step"], "-" if e["eval_ce"] is None else f"{e['eval_ce']:.4f}", f"{deep(e):.4f}",
             *[f"{100 * v:.1f}" for v in e["refusal"].values()]] for e in sorted(log["evals"], key=lambda e: e["step"])]
    pl.print_table(["step", "held-out CE", "drift cos (deep half)", *[f"% refused: {k}" for k in run.refusal_sets]],
                   rows)
    if args.save_merged:
        artifacts.save_merged(os.path.join(work, "merged"), "adapter", os.path.join(work, "adapter"), args.model, args)
    print(f"\nwrote {', '.join(outputs(args))} to {args.out} in {time.time() - t0:.0f}s (peak memory "
          f"{pl.peak_memory_mib(run.device):.0f} MiB; pairs whose response --max-length cut off: {run.cut[0]})")


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


def constrained_layers(spec, n_layers):
    """--layers: 'all' is 1..L-1. [choice] The abstract says the constraint is on "the hidden state"; the input of
    layer 0 is the token embedding, and every chat-formatted prompt ends in the same template token, so r_hat_0 is 0."""
    layers = list(range(1, n_layers)) if spec == "all" else spec
    bad = [l for l in layers if not 1 <= l < n_layers]
    if bad:
        pl.fail(f"--layers: layer {bad[0]} is out of range for a model with {n_layers} layers (1..{n_layers - 1}; "
                "the input of layer 0 is the embedding, whose r_hat_0 is 0)")
    return layers
