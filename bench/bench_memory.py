"""Peak memory of one ProCon training step at the shape of a real chat model, with and without gradient checkpointing,
and the size of ACTOR's cache per query.

A Llama-architecture model with random weights in the shape of a real chat model is written once (bf16 safetensors,
cached under ~/.cache/refusal-steering/random-SHAPE) and loaded in 4-bit NF4 as procon.py loads it with
--load-in-4bit. Each configuration runs in a fresh process: LoRA on the attention projections, then one optimizer step
of procon.py's training loss (CE + alpha * constraint on every layer, --constrained-tokens all: the constraint reads
every token's hidden state, the most it can keep alive) on random tokens. The memory reported is the step's own peak:
CUDA max allocated on a GPU; on the CPU the peak resident set size, reset after loading (Linux /proc/self/clear_refs).

    python bench/bench_memory.py                                 # 1B shape, CPU; 12 configurations, ~20 min idle
    python bench/bench_memory.py --shape 7b --device cuda         # Llama-2-7B shape on a GPU
    python bench/bench_memory.py --lengths 256 --batches 1        # one quick row

Prints a markdown table in the form of results/memory.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import actor
import loading
import runrecord

SHAPES = {  # Llama-3.2-1B-Instruct and Llama-2-7b-chat
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,  # a smoke test
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096, tie_word_embeddings=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=tuple(SHAPES), default="1b", help="model shape")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--lengths", default="256,512,1024", help="sequence lengths (tokens), comma-separated")
    p.add_argument("--batches", default="1,4", help="batch sizes, comma-separated")
    p.add_argument("--no-4bit", action="store_true", help="load in bf16 (GPU) / fp32 (CPU) instead of 4-bit NF4")
    p.add_argument("--ce-chunk", type=int, default=0, help="procon.py --ce-chunk: logits this many tokens at a time")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-tokens-plain", type=int, default=None, help="skip configurations without checkpointing "
                   "above this many tokens (batch x length) when they would not fit the machine")
    p.add_argument("--out", default="runs/bench_memory.jsonl", help="each configuration's row is appended here; rows "
                   "of earlier runs of the same shape and device are reused")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    return p.parse_args(argv)


def random_model(shape):
    """A Llama model with random weights of the given shape, written once (bf16 safetensors) and cached."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.path.join(runrecord.CACHE, f"random-{shape}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    print(f"writing a random {shape}-shaped Llama to {path} (once)", file=sys.stderr)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], dtype="bfloat16"))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def rss_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def one(path, device, length, batch, checkpointing, four_bit, ce_chunk=0):
    """One configuration in this process: load, LoRA, one procon step; the step's peak memory in MiB."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import procon as P
    import training

    kwargs = {"dtype": torch.bfloat16 if device.startswith("cuda") else torch.float32, "device_map": {"": device}}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval().requires_grad_(False)
    training.keep_4bit_trainable(model)
    flags = ["--alpha", "1", "--constrained-tokens", "all", "--ce-chunk", str(ce_chunk)] + \
        (["--gradient-checkpointing"] if checkpointing else [])
    args = P.parse_args(flags)
    model, params = training.make_trainable(model, args)
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, :length // 4] = -100  # a prompt of a quarter of the tokens carries no loss
    batch_t = (ids, torch.ones_like(ids), labels, torch.ones_like(ids, dtype=torch.bool))
    r = torch.nn.functional.normalize(torch.randn(n_layers, d, generator=g), dim=-1).to(device)
    layers = list(range(1, n_layers))
    z0 = torch.zeros(len(layers), batch * length)
    norm = {"tokens": int((labels[:, 1:] != -100).sum()), "samples": batch, "positions": batch * length}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
        before = rss_mib("VmRSS")
    t = time.time()
    loss, _, _ = P.training_loss(model, batch_t, device, r, z0, 1.0, layers, args, norm)
    loss.backward()
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = rss_mib("VmHWM")
    # ACTOR's cache per query: everything block l* receives for one query of this length
    cache = {}

    def grab(module, a, kw):
        cache["bytes"] = sum(x.numel() * x.element_size() for x in actor.tensors_in((a, kw)))
        raise StopIteration

    h = loading.decoder_layers(model)[n_layers // 2].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), use_cache=False)
    except StopIteration:
        pass
    h.remove()
    return {"length": length, "batch": batch, "checkpointing": checkpointing, "loaded_mib": round(before),
            "peak_mib": round(peak), "step_mib": round(peak - before), "seconds": round(time.time() - t, 1),
            "actor_cache_kib_per_query": round(cache.get("bytes", 0) / 1024, 1)}


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        length, batch, ckpt = (int(x) for x in args.one.split(","))
        print(json.dumps(one(random_model(args.shape), args.device, length, batch, bool(ckpt), not args.no_4bit,
                             args.ce_chunk)))
        return
    random_model(args.shape)
    key = {"shape": args.shape, "device": args.device, "four_bit": not args.no_4bit, "ce_chunk": args.ce_chunk}
    done = []
    if os.path.isfile(args.out):
        done = [r for r in map(json.loads, open(args.out)) if all(r.get(k, 0) == v for k, v in key.items())]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            for ckpt in (0, 1):
                old = [r for r in done if (r["length"], r["batch"], r["checkpointing"]) == (length, batch, bool(ckpt))]
                if old:
                    rows.append(old[-1])
                    continue
                if not ckpt and args.max_tokens_plain and length * batch > args.max_tokens_plain:
                    rows.append({"length": length, "batch": batch, "checkpointing": False, "skipped": True})
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--shape", args.shape, "--device", args.device,
                       "--one", f"{length},{batch},{ckpt}", "--threads", str(args.threads),
                       "--ce-chunk", str(args.ce_chunk)] + \
                    (["--no-4bit"] if args.no_4bit else [])
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    print(r.stderr[-2000:], file=sys.stderr)
                    sys.exit(f"configuration {length} x {batch}, checkpointing {ckpt}: failed")
                rows.append({**key, **json.loads(r.stdout.strip().splitlines()[-1])})
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(rows[-1]) + "\n")
                print(f"  {length} tokens x {batch}, checkpointing {'on' if ckpt else 'off'}: "
                      f"step {rows[-1]['step_mib']} MiB ({rows[-1]['seconds']} s)", file=sys.stderr)
    shape = SHAPES[args.shape]
    print(f"\n{args.shape} shape (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
          f"{shape['num_key_value_heads']} KV heads, vocab {shape['vocab_size']}), "
          f"{'bf16/fp32' if args.no_4bit else '4-bit NF4'}, {args.device}, "
          "LoRA r8 on q/k/v/o, --constrained-tokens all, "
          f"--ce-chunk {args.ce_chunk}\n")
    print("| tokens | batch | loaded model (MiB) | peak, no checkpointing (MiB) | peak, checkpointing (MiB) "
          "| step memory above the loaded model: without / with | peak ratio | seconds without / with |")
    print("|---:|---:|---:|---:|---:|---|---:|---|")
    for i in range(0, len(rows), 2):
        off, on = rows[i], rows[i + 1]
        if off.get("skipped"):
            print(f"| {on['length']} | {on['batch']} | {on['loaded_mib']} | not run | {on['peak_mib']} | - / "
                  f"{on['step_mib']} | - | - / {on['seconds']} |")
            continue
        ratio = off["peak_mib"] / max(on["peak_mib"], 1)
        print(f"| {off['length']} | {off['batch']} | {off['loaded_mib']} | {off['peak_mib']} | {on['peak_mib']} | "
              f"{off['step_mib']} / {on['step_mib']} | {ratio:.1f}x | {off['seconds']} / {on['seconds']} |")
    per_token = {r["length"]: r["actor_cache_kib_per_query"] / r["length"] for r in rows if not r.get("skipped")}
    print("\nACTOR's cache (the inputs of one block, fp32 on the CPU): "
          + ", ".join(f"{kib * L:.0f} KiB per query of {L} tokens" for L, kib in per_token.items()))


if __name__ == "__main__":
    main()
