"""One ACTOR epoch two ways, on the cached inputs of block l* and through layers 0..l* at every step: the reference
that tests/test_actor.py checks the cache against, and that bench/bench_actor.py times."""
import torch

import actor as A
import inference
import loading


def cached_epoch(block, cache, groups, opt):
    """One ACTOR epoch on the cache: renew R_hat and the targets (block l* forward), one pass forward and backward."""
    a = A.activations(block, cache, len(groups))
    a_tgt = A.targets(a, A.refusal_direction(a, groups), groups, 1.0, A.origin_of("harmless", a, a, groups))
    return A.train_epoch(block, cache, a_tgt, opt, list(range(len(cache))))


def uncached_epoch(model, block, batches, groups, opt):
    """The same epoch with no cache: every step runs the embeddings and layers 0..l* (stopped right after l*)."""
    out = {}

    def stop(module, args, output):
        out["h"] = output[0] if isinstance(output, tuple) else output
        raise A._Stop

    def block_output(enc):
        try:
            model(**enc, use_cache=False)
        except A._Stop:
            pass
        return out.pop("h")[:, -1].float()

    with inference.hooks([(block, "post", stop)]):
        with torch.no_grad():
            a = torch.zeros(len(groups), loading.text_config(model).hidden_size)
            for idx, enc in batches:
                a[idx] = block_output(enc)
        a_tgt = A.targets(a, A.refusal_direction(a, groups), groups, 1.0, A.origin_of("harmless", a, a, groups))
        total = 0.0
        for idx, enc in batches:
            loss = A.loss_fn(block_output(enc), a_tgt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
    return total / len(groups)
