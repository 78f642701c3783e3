"""Speed of evaluate.py's pieces: batched generation against one prompt at a time on the same prompts, and the logit
judge (one forward pass, no generation) against generation plus the keyword judge.

    python bench/bench_generation.py                   # SmolLM2, 32 prompts of data/pseudo_harmful.json, 64 new tokens
    python bench/bench_generation.py --model M --n 64 --max-new-tokens 256 --batch-size 32

Prints the times and the two ratios (targets: batched at least 4x faster than one at a time; the logit judge at least
10x faster than generation plus keyword judge). Timings depend on the machine; nothing here is asserted.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chat
import cli
import inference
import judges  # noqa: E402
import keywords  # noqa: E402
import loading


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    p.add_argument("--prompts", default=os.path.join(cli.DATA, "pseudo_harmful.json"), help="prompt file")
    p.add_argument("--n", type=int, default=32, help="number of prompts (the first n of the file)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    args = p.parse_args()

    model, tok = loading.load_model(args.model, args.load_in_4bit, args.chat_template, args.trust_remote_code,
                                    args.device)
    prompts = chat.read_prompts(args.prompts)[:args.n]
    inference.generate(model, tok, prompts[:2], 4, 2)  # warm-up

    t = time.perf_counter()
    single = [inference.generate(model, tok, [q], args.max_new_tokens, 1, desc="one at a time")[0] for q in prompts]
    t_single = time.perf_counter() - t
    t = time.perf_counter()
    batched = inference.generate(model, tok, prompts, args.max_new_tokens, args.batch_size, desc="batched")
    keyword = [keywords.is_refusal(r) for r in batched]
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    scores = judges.refusal_score(inference.last_logits(model, tok, prompts, args.batch_size),
                                  judges.fallback_refusal_tokens(tok))
    t_logit = time.perf_counter() - t

    lengths = [len(tok(r, add_special_tokens=False).input_ids) for r in batched]
    print(f"{args.model}\n{len(prompts)} prompts, up to {args.max_new_tokens} new tokens "
          f"(mean {sum(lengths) / len(lengths):.0f}), "
          f"batch size {args.batch_size}, device {loading.model_device(model)}")
    print(f"{'one at a time':>28}: {t_single:7.2f} s  ({len(prompts) / t_single:6.2f} prompts/s)")
    print(f"{'batched':>28}: {t_batched:7.2f} s  ({len(prompts) / t_batched:6.2f} prompts/s)")
    print(f"{'logit judge (no generation)':>28}: {t_logit:7.2f} s  ({len(prompts) / t_logit:6.2f} prompts/s)")
    print(f"batched vs one at a time: {t_single / t_batched:.1f}x faster (target >= 4)")
    print(f"logit judge vs batched generation + keyword judge: {t_batched / t_logit:.1f}x faster (target >= 10)")
    same = sum(a == b for a, b in zip(single, batched))
    print(f"same response batched and alone: {same}/{len(prompts)} (left padding changes float rounding only); "
          f"keyword refusals {sum(keyword)}, logit refusals {int((scores > 0).sum())}")


if __name__ == "__main__":
    main()
