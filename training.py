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
import sys

import torch

import chat
import cli
import loading
import rundir
import runrecord

RANK, WORLD = 0, int(os.environ.get("WORLD_SIZE", 1))  # data parallel: this process's rank, the number of processes


# ============================================================================ pair files
def read_pairs(path, refusals=None, seed=0):
    """(prompt, response) pairs; a prompt-only file gets a refusal from `refusals` (seeded choice) when given."""
    rows = chat.read_records(path)
    rng = random.Random(seed)
    pairs = []
    for i, r in enumerate(rows):
        text = lambda k: chat.text_of(r[k], path, i + 1, k)  # noqa: E731  (a list or an object is an error)
        if r.get("instruction") is not None and r.get("output") is not None:  # Alpaca
            prompt = text("instruction") + ("\n\n" + text("input") if str(r.get("input") or "").strip() else "")
            pairs.append((prompt, text("output")))
        elif r.get("prompt") is not None and (r.get("response"), r.get("completion")) != (None, None):
            pairs.append((text("prompt"), text("response" if r.get("response") or r.get("completion") is None
                                               else "completion")))
        elif r.get("question") is not None and r.get("answer") is not None:  # GSM8K
            pairs.append((text("question"), text("answer")))
        elif refusals and any(r.get(c) is not None for c in chat.PROMPT_COLUMNS):
            pairs.append((next(text(c) for c in chat.PROMPT_COLUMNS if r.get(c) is not None), rng.choice(refusals)))
        else:  # a row no format reads would silently add nothing
            cli.fail(f"{path}: row {i + 1} is not usable: expected " + (", ".join(chat.PROMPT_COLUMNS) if refusals else
                    "instruction/output, prompt/response or question/answer") + f", not empty (it has {', '.join(r)})")
        if not all(pairs[-1]):  # an empty prompt or answer, dropped, would change the data without a word
            cli.fail(f"{path}: row {i + 1} has an empty {'prompt' if not pairs[-1][0] else 'response'}")
    if not pairs:
        kind = "prompts" if refusals else "instruction-response pairs"
        cli.fail(f"{path}: no usable {kind} (expected instruction/output, prompt/response or question/answer)")
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
    return {n.split(".")[-1] for block in loading.decoder_layers(model) for n, m in block.named_modules()
            if isinstance(m, kinds)}


def lora_targets(model, spec):
    """LoRA target modules: 'auto' finds the attention projections of this model (q/k/v/o, or fused ones such as
    qkv_proj, query_key_value, c_attn, with their output projection), 'all-linear' every linear layer, or a list
    that must name linear layers the model has. Not peft's per-architecture mapping: it names q_proj and v_proj alone
    for Llama and Qwen2 (not k_proj, o_proj) and knows only the architectures it lists."""
    have = linear_names(model)
    if spec == "all-linear":
        return "all-linear"
    if spec == "auto":
        block = loading.decoder_layers(model)[0]
        children = dict(block.named_children())
        attn_name = next((n for n in ATTENTION if n in children), None)
        if attn_name is None:
            cli.fail(f"--lora-targets auto: no attention module in {type(block).__name__}; name the targets among "
                    f"its linear layers: {', '.join(sorted(have))}")
        found = [f"{attn_name}.{n}" for n, m in children[attn_name].named_children() if n in have]
        if not found:
            cli.fail(f"--lora-targets auto: no linear layer in {attn_name}; name them among: {', '.join(sorted(have))}")
        return found
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    missing = [t for t in wanted if t.split(".")[-1] not in have]
    if missing or not wanted:
        named = ", ".join(missing) or repr(spec)
        cli.fail(f"--lora-targets: {named} not among this model's linear layers: "
                f"{', '.join(sorted(have))}")
    return wanted


def keep_4bit_trainable(model):
    """bitsandbytes repacks 4-bit weights for a faster CPU kernel on their first no-grad forward; that kernel adds a
    projection's bias in place, which autograd refuses (Qwen2, Phi: biased q/k/v). Training keeps the plain layout."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def make_trainable(model, args):
    """LoRA adapters on the chosen targets (peft), or every weight with --full; under data parallel every process
    starts from rank 0's weights. Returns (model, parameters)."""
    if loading.offloaded(model):
        cli.fail("training goes through every layer, and some of this model's weights are offloaded (to the CPU or the "
                "disk); give --max-memory room for all of them on the GPUs, or use --load-in-4bit")
    if args.full:
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model, args.lora_targets)
        print(f"LoRA r={args.lora_r} on {targets if isinstance(targets, str) else ', '.join(targets)}")
        # lora_dropout 0: the model stays in eval mode (no dropout anywhere), so the step-0 constraint is exactly 0
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
        for block in loading.decoder_layers(model):
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
        cli.check_finite(v, f"the trained weights after step {step}", " (they were not written)")
    return state


def save_checkpoint(folder, model, opt, step, state):
    """The trainable weights (finite, or the run stops), the optimizer's state, the step and `state` (a JSON dict)."""
    from safetensors.torch import save_file

    save_file(trainable_state(model, step), os.path.join(folder, "trainable.safetensors"))
    torch.save(opt.state_dict(), os.path.join(folder, "optimizer.pt"))
    runrecord.save_json(os.path.join(folder, "state.json"), {"step": step, **state})


def read_saved(work, name, out):
    """A torch file an unfinished run saved in its work folder (read on --resume), or None where there is none."""
    path = os.path.join(work, name)
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:
        cli.fail(f"{out}: the unfinished run's {name} is damaged ({type(e).__name__}); start again with --overwrite")
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
                cli.fail(f"{what}: {k} is not the model's ({v.dtype}, shape {list(v.shape)}); start again with "
                        "--overwrite")
            if v.is_floating_point() and not torch.isfinite(v).all():
                cli.fail(f"{what}: {k} holds NaN or infinite values; start again with --overwrite")


def checkpoint(work, step, model, opt, state):
    """A checkpoint of the run in `work` (rundir.write_checkpoint: whole or not at all), written by rank 0 alone."""
    if RANK == 0:
        rundir.write_checkpoint(work, step, lambda folder: save_checkpoint(folder, model, opt, step, state))


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
        cli.fail(f"{found[1]}: damaged checkpoint ({type(e).__name__}: {str(e)[:80]}); start again with --overwrite")


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
        cli.fail(f"{work}: damaged checkpoint ({type(e).__name__}: {str(e)[:80]}); start again with --overwrite")
    print(f"resuming after step {state['step']}")
    return state


# ============================================================================ data parallel (torchrun, accelerate)
# One process per device, each with a whole model. Each optimizer step's micro-batches (--grad-accum of them) are
# dealt out to the processes, every WORLD-th to each; after the step's backward passes the gradients are summed over
# the processes (one all-reduce, SUM, per trainable tensor) and every process takes the same AdamW step. procon.step
# normalises each micro-batch's loss by the whole step's tokens and samples, so the sum is the one-process step's
# gradient exactly (up to float summation order). Why an explicit all-reduce after backward rather than
# torch's DistributedDataParallel: exact, a few lines, the same for LoRA and --full; DDP would overlap the
# communication with backward (faster across many GPUs). Rank 0 alone writes (the run's folder, lock, checkpoints,
# outputs) and reads what a resume continues from; the other processes get it from rank 0.


def init_distributed(args):
    """Under torchrun or accelerate launch (WORLD_SIZE > 1): checked, then the process group joined (nccl on GPUs, gloo
    on the CPU), this process's GPU cuda:LOCAL_RANK, the model (a .gguf converted once, by rank 0), the other ranks'
    stdout and progress bars silenced. --grad-accum left unset becomes the number of processes (1 in one process), so
    that every reader of args.grad_accum (the batches, the recorded settings a resume compares) sees the number used.
    Returns this process's Parallel (in one process too)."""
    global RANK
    if args.grad_accum is None:  # the default: one micro-batch per process and step (nanoGPT's choice)
        args.grad_accum = WORLD
    if WORLD == 1:
        return Parallel()
    if args.device_map:
        cli.fail("--device-map spreads one model over devices; under torchrun each process holds a whole model")
    if args.device and args.device not in ("cuda", "cpu"):
        cli.fail(f"--device {args.device}: under torchrun each process takes its own GPU (cuda:LOCAL_RANK); pass cuda "
                "or cpu")
    if args.grad_accum % WORLD:
        cli.fail(f"--grad-accum {args.grad_accum}: each of the {WORLD} processes takes the same share of a step's "
                f"micro-batches; use a multiple of {WORLD}")
    cuda = loading.check_device(args.device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    atexit.register(torch.distributed.destroy_process_group)  # a process that stops early leaves the group cleanly
    RANK = torch.distributed.get_rank()
    from_rank0(lambda: loading.resolve_model(args.model))
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
def rank0_run_folder(out, *args, **kwargs):
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
            except cli.UserError as e:
                error = str(e)
        error = from_rank0(lambda: error)
        if error:
            cli.fail(error)
        yield work


# ============================================================================ procon.py's run: flags, checks, outputs


