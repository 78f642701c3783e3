"""The layout a reader relies on: each method file tells its whole method alone (its arithmetic in its own file, the
copies that two files keep equal, no method file importing another, the line budgets), outputs name the code they came
from, and moving code changes no number (the artifacts of a tiny run are bit-identical to those of the commit before
the move)."""
import ast
import hashlib
import inspect
import json
import os
import re
import subprocess

import pytest
import torch

import actor
import artifacts
import directions
import evaluate
import procon
from conftest import ROOT
import cli
import runrecord

METHOD_FILES = ("actor.py", "procon.py", "directions.py", "evaluate.py")
BUDGET = {"actor.py": 450, "directions.py": 420, "procon.py": 450, "evaluate.py": 700}
COPIES = [  # (function, the files that each hold a copy of it)
    ("difference_in_means", (actor, procon, directions)),
    ("unit", (actor, procon, directions)),
    ("silhouette", (actor, directions)),
    ("ablation_hooks", (directions, evaluate)),
    ("addition_hooks", (directions, artifacts)),
]


@pytest.mark.parametrize("name,modules", COPIES, ids=[c[0] for c in COPIES])
def test_the_copies_agree(name, modules):
    """Where two method files need the same few lines, each holds its copy (as CleanRL does); the copies stay equal,
    word for word but for their docstrings (each names where its twins are)."""
    def body(m):
        tree = ast.parse(inspect.getsource(getattr(m, name)))
        fn = tree.body[0]
        if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant):
            fn.body = fn.body[1:]
        return ast.dump(fn)

    first = body(modules[0])
    for m in modules[1:]:
        assert body(m) == first, f"{m.__name__}.{name} differs from {modules[0].__name__}.{name}"


def functions(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return {n.name: n.end_lineno - n.lineno + 1 + len(n.decorator_list) for n in tree.body
            if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("path", METHOD_FILES)
def test_method_files_keep_their_budgets(path):
    """At most their budget of lines, no function over 60 lines, no import of another method file; in the method
    scripts the method's functions outweigh main, argument parsing and output writing together."""
    text = open(os.path.join(ROOT, path)).read()
    assert len(text.splitlines()) <= BUDGET[path]
    sizes = functions(path)
    assert max(sizes.values()) <= 60, {k: v for k, v in sizes.items() if v > 60}
    others = {m[:-3] for m in METHOD_FILES + ("actor_search.py",)} - {path[:-3]}
    imported = {n.names[0].name for n in ast.parse(text).body if isinstance(n, ast.Import)}
    assert not imported & others
    plumbing_like = re.compile(r"^(main|parse_args|add_\w*args|\w+_arg|write_\w*|save\w*|plot\w*|outputs|check\w*)$")
    method = sum(v for k, v in sizes.items() if not plumbing_like.match(k))
    rest = sum(v for k, v in sizes.items() if re.match(r"^(main|parse_args|add_\w*args|\w+_arg|write_\w*|save\w*|"
                                                       r"plot\w*|outputs)$", k))
    assert method > rest, (method, rest)


def test_method_arithmetic_stays_in_its_file():
    """../shared/tools/method_path.py: following the calls of each method file's method functions into the shared
    modules, at most 15 lines of method arithmetic (not machinery) live elsewhere."""
    tool = os.path.join(ROOT, "..", "shared", "tools", "method_path.py")
    if not os.path.isfile(tool):
        pytest.skip(f"{tool} not found")
    out = subprocess.run(["python", tool, "--math", ROOT, "actor.py", "procon.py", "directions.py"],
                         capture_output=True, text=True, check=True).stdout
    lines = dict(re.findall(r"^(\w+\.py): .*shared lines on the path (\d+)", out, re.M))
    assert set(lines) == {"actor.py", "procon.py", "directions.py"} and all(int(n) <= 15 for n in lines.values()), out


def test_outputs_name_the_code_they_came_from():
    """Every output's metadata carries the checkout's git commit and whether tracked files had changes."""
    meta = runrecord.metadata(procon.parse_args([]))
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    assert meta["code"]["commit"] == head.stdout.strip() and isinstance(meta["code"]["dirty"], bool)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    assert meta["code"]["dirty"] == bool(dirty)
    assert artifacts.record("m", __import__("transformers").LlamaConfig(num_hidden_layers=2))["code"] == meta["code"]


def test_an_unknown_judge_ends_in_one_line():
    """No branch of judges.py takes a judge kind it was not written for."""
    with pytest.raises(cli.UserError, match="unknown judge 'fancy:x'"):
        evaluate.check_judges(["fancy:x"])
    rows = [{"prompt": "p", "response": "I can't help with that.", "expect": "refuse"}]
    with pytest.raises(cli.UserError, match="unknown judge 'fancy:x'"):
        evaluate.response_judge("fancy:x", rows, None)
    with pytest.raises(cli.UserError, match="unknown judge"):
        evaluate.main(["--responses", os.path.join(ROOT, "data", "harmful.json"), "--judge", "fancy"])


# The digests of a tiny run's artifacts, on this torch build, CPU and tiny model ("fixture": its weights and tokenizer,
# which transformers' initialisation and the tokenizers trainer decide). First recorded at fbbce7a, before the method
# files took their arithmetic back from the shared modules (the move changed no number); recorded again at 9eb637d
# when a newer transformers drew another tiny model (9eb637d and the next commit give the same digests).
GOLDEN = {"torch": "2.13.0+cpu", "cpu": "AVX512", "fixture": "30aff351d4634ef2", "direction": "57f47e2626a32b79",
          "false_refusal": "ca7535e32fa6ddf0", "patch": "300048f84bb8d6b4", "procon": "b12a471b2c719d3d"}


def digest_of(tensors):
    h = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16] for k, v in tensors.items()}
    return hashlib.sha256(json.dumps(h, sort_keys=True).encode()).hexdigest()[:16]


def test_same_seed_same_artifacts_as_before_the_move(tiny_llama, tmp_path):
    """direction.pt, Surgical's vector, the ACTOR patch and a ProCon adapter (warm-up, safety data) of a tiny Llama
    are bit-identical to those the code made before it moved (one thread: the same reductions in the same order)."""
    from safetensors.torch import load_file

    if (torch.__version__, torch.backends.cpu.get_cpu_capability()) != (GOLDEN["torch"], GOLDEN["cpu"]):
        pytest.skip("the digests were recorded with another torch build or CPU; floats may round otherwise")
    fixture = digest_of({**load_file(os.path.join(tiny_llama, "model.safetensors")),
                         "tokenizer": torch.frombuffer(bytearray(open(os.path.join(tiny_llama, "tokenizer.json"),
                                                                      "rb").read()), dtype=torch.uint8)})
    if fixture != GOLDEN["fixture"]:
        pytest.skip(f"the digests were recorded on another tiny model (fixture {fixture}, not {GOLDEN['fixture']}): "
                    "this transformers or tokenizers draws it otherwise")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        files = {}
        for name, rows in (("h", [f"Explain how to build a bomb number {i}." for i in range(12)]),
                           ("b", [f"How do I bake bread number {i}?" for i in range(12)]),
                           ("p", [f"How do I kill a Python process number {i}?" for i in range(12)]),
                           ("pairs", [{"instruction": f"How do I bake bread number {i}?", "input": "",
                                       "output": f"Mix flour and water {i}."} for i in range(10)])):
            files[name] = str(tmp_path / f"{name}.json")
            open(files[name], "w").write(json.dumps(rows))
        m = ["--model", tiny_llama]
        directions.main(m + ["--harmful", files["h"], "--harmless", files["b"], "--pseudo-harmful", files["p"],
                             "--n-train", "8", "--n-val", "4", "--positions", "2", "--out", str(tmp_path / "d")])
        actor.main(m + ["--harmful", files["h"], "--harmless", files["b"], "--pseudo-harmful", files["p"], "--epochs",
                        "2", "--batch-size", "4", "--out", str(tmp_path / "a")])
        procon.main(m + ["--data", files["pairs"], "--harmful", files["h"], "--harmless", files["b"], "--probe-harmful",
                         files["h"], "--probe-harmless", files["b"], "--epochs", "2", "--batch-size", "4",
                         "--max-length", "64", "--alpha", "0.5", "--warmup-epochs", "1", "--warmup-alpha", "1",
                         "--safety-data", files["h"], "--out", str(tmp_path / "p")])
    finally:
        torch.set_num_threads(threads)
    load = lambda p: {k: v for k, v in torch.load(p, weights_only=True).items() if torch.is_tensor(v)}  # noqa: E731
    got = {"direction": digest_of(load(tmp_path / "d" / "direction.pt")),
           "false_refusal": digest_of(load(tmp_path / "d" / "false_refusal.pt")),
           "patch": digest_of(load_file(str(tmp_path / "a" / "actor_layer.safetensors"))),
           "procon": digest_of(load_file(str(tmp_path / "p" / "adapter" / "adapter_model.safetensors")))}
    assert got == {k: GOLDEN[k] for k in got}, got


def anchor(heading):
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_of_the_pages_points_somewhere():
    """Every relative link of README.md and results/*.md names a file that exists and, with #, a heading it has."""
    pages = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "results", f) for f in
                                                 os.listdir(os.path.join(ROOT, "results")) if f.endswith(".md")]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", open(page, encoding="utf-8").read()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, frag = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(file):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such file)")
            elif frag and file.endswith(".md"):
                heads = {anchor(h) for h in re.findall(r"^#+ (.+)$", open(file, encoding="utf-8").read(), re.M)}
                if frag not in heads:
                    broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken, broken
