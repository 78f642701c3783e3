"""The layout a reader relies on: each method file tells its whole method alone (its arithmetic in its own file, the
copies that two files keep equal, no method file importing another), "shared means shared" (every definition of a
shared module is reached by two or more scripts, or stands in the one-user table below with its reason), one name
for one function, outputs that name the code they came from, and moving code changes no number (the artifacts of a
tiny run equal, within rounding, those recorded before the move)."""
import ast
import os
import re
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT

import artifacts
import cli
import evaluate
import procon
import runrecord

SCRIPTS = ("actor.py", "actor_search.py", "directions.py", "evaluate.py", "procon.py")  # the entry points
METHOD_FILES = ("actor.py", "procon.py", "directions.py", "evaluate.py")
SHARED = ("cli.py", "runrecord.py", "chat.py", "loading.py", "inference.py", "rundir.py", "artifacts.py", "judges.py",
          "keywords.py", "training.py")
COPIES = [  # (function, the files that each hold a copy of it)
    ("difference_in_means", ("actor.py", "procon.py", "directions.py")),
    ("unit", ("actor.py", "procon.py", "directions.py")),
    ("silhouette", ("actor.py", "directions.py")),
    ("ablation_hooks", ("directions.py", "evaluate.py")),
    ("addition_hooks", ("directions.py", "artifacts.py")),
]
CONVENTIONS = {"main", "parse_args", "check_args", "write_outputs"}  # each script's own entry points, read alone
TRAINING = "fine-tuning machinery (pair files, LoRA set-up, checkpoints, data parallel) a second trainer would share"
CHECKPOINT = "a checkpoint folder is the run folder's: run_folder's --resume and has_progress read them"
ONE_USER = {  # shared definitions one script reaches, and why they stay shared (machinery only: no [choice] in them)
    "rundir.write_checkpoint": CHECKPOINT, "rundir.last_checkpoint": CHECKPOINT,
    "keywords.judge_without": "the keyword judge scored without the patterns of one source (bench/bench_judges.py)",
    **{f"training.{n}": TRAINING for n in (
        "linear_names", "lora_targets", "keep_4bit_trainable", "make_trainable", "trainable_state",
        "save_checkpoint", "read_saved", "check_whole", "checkpoint", "read_checkpoint", "restore", "init_distributed",
        "from_rank0", "Parallel", "rank0_run_folder")},
}
# [choice]s that live in a shared module: allowed only where two or more scripts share the definition
SHARED_CHOICES = {"judges.refusal_tokens", "judges.opener_tokens"}


def trees(root):
    return {f[:-3]: ast.parse(open(os.path.join(root, f), encoding="utf-8").read())
            for f in SCRIPTS + SHARED if os.path.isfile(os.path.join(root, f))}


def definitions(tree):
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def references(node, module, aliases, defs):
    """The (module, name) definitions of the shared modules that a piece of code names."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases:
            key = (aliases[n.value.id], n.attr)
        elif isinstance(n, ast.Name):
            key = (module, n.id)
        else:
            continue
        if key in defs:
            found.add(key)
    return found


def users(root):
    """{(shared module, name): the scripts that reach it}, following every reference (main's too) through the
    shared modules; a shared module's top-level statements count as reached by every script that imports it."""
    ts = trees(root)
    shared = {f[:-3] for f in SHARED}
    defs = {(m, k): v for m in shared & set(ts) for k, v in definitions(ts[m]).items()}
    aliases = {m: {a.asname or a.name: a.name for n in ast.walk(t) if isinstance(n, ast.Import) for a in n.names
                   if a.name in ts} for m, t in ts.items()}
    body = {m: [n for n in t.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))] for m, t in ts.items()}
    out = {k: set() for k in defs}
    for script in (f[:-3] for f in SCRIPTS):
        todo = list(references(ts[script], script, aliases[script], defs))
        imported, seen = set(aliases[script].values()) & shared, set()
        while todo or imported:
            for m in list(imported):  # module-level code of each shared module reached
                imported.discard(m)
                if m not in seen:
                    seen.add(m)
                    todo += [r for n in body[m] for r in references(n, m, aliases[m], defs)]
                    imported |= set(aliases[m].values()) & shared
            if todo:
                key = todo.pop()
                if script not in out[key]:
                    out[key].add(script)
                    todo += list(references(defs[key], key[0], aliases[key[0]], defs))
    return out, defs


def layout_problems(root):
    """What breaks the layout rules in the checkout at root (an empty list: none)."""
    problems = []
    reach, defs = users(root)
    for (m, name), scripts in sorted(reach.items()):
        key = f"{m}.{name}"
        if len(scripts) < 2 and key not in ONE_USER:
            problems.append(f"{key}: reached by {sorted(scripts) or 'no script'} alone; move it home or give it a "
                            "reason in ONE_USER")
        if key in ONE_USER and "[choice]" in ast.get_source_segment(open(os.path.join(root, m + ".py")).read(),
                                                                    defs[(m, name)]):
            problems.append(f"{key}: a [choice] in a one-user definition belongs in its script")
    problems += [f"ONE_USER names {k}, which is no shared definition" for k in ONE_USER
                 if tuple(k.split(".")) not in defs]
    ts = trees(root)
    names = {}
    for m, t in ts.items():
        for name in definitions(t):
            names.setdefault(name, []).append(m)
    copies = {c for c, _ in COPIES}
    problems += [f"{name} is defined in {', '.join(ms)}" for name, ms in names.items()
                 if len(ms) > 1 and name not in copies and not (name in CONVENTIONS and set(ms) <= {
                     f[:-3] for f in SCRIPTS})]
    for name, files in COPIES:
        bodies = set()
        for f in files:
            fn = definitions(ts[f[:-3]])[name]
            body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) \
                else fn.body
            bodies.add(ast.dump(ast.Module(body=body, type_ignores=[])) + ast.dump(fn.args))
        if len(bodies) > 1:
            problems.append(f"the copies of {name} in {', '.join(files)} differ")
    for path in METHOD_FILES:
        tree = ts[path[:-3]]
        sizes = {n.name: n.end_lineno - n.lineno + 1 + len(n.decorator_list) for n in tree.body
                 if isinstance(n, ast.FunctionDef)}
        problems += [f"{path}: {k} has {v} lines (at most 60)" for k, v in sizes.items() if v > 60]
        others = {m[:-3] for m in METHOD_FILES + ("actor_search.py",)} - {path[:-3]}
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} & others
        problems += [f"{path} imports {m}" for m in imported]
        rest_re = r"^(main|parse_args|add_\w*args|\w+_arg|write_\w*|save\w*|plot\w*|outputs)$"
        method = sum(v for k, v in sizes.items() if not re.match(rest_re[:-2] + r"|check\w*)$", k))
        rest = sum(v for k, v in sizes.items() if re.match(rest_re, k))
        if method <= rest:
            problems.append(f"{path}: the method's functions ({method} lines) do not outweigh main, flags and "
                            f"outputs ({rest})")
        for key in sorted(k for k, s in reach.items() if path[:-3] in s and f"{k[0]}.{k[1]}" not in SHARED_CHOICES):
            if "[choice]" in ast.get_source_segment(open(os.path.join(root, key[0] + ".py")).read(), defs[key]):
                problems.append(f"{path} reaches a [choice] in {key[0]}.{key[1]}: the method's choices live in its "
                                "file")
    return problems


def test_the_layout_holds():
    """Shared means shared (the usage rule, main's calls counted too), no [choice] of a method outside its file, one
    name for one function (the copies and each script's own entry points aside), the copies word for word equal but
    for their docstrings, no function over 60 lines, no method file importing another, and in each method file the
    method's functions outweigh main, argument parsing and output writing together."""
    assert layout_problems(ROOT) == []


FORKS = {  # what a user forking a script for an ablation adds: it must pass the same rules
    "procon.py": [("def training_loss(", '''# a fork: the squared hinge with a margin, max(|z - z0| - margin, 0)^2
def squared_hinge(z, z0, margin):
    """The squared hinge on each projection's distance from its anchor, beyond a margin."""
    return ((z - z0).abs() - margin).clamp(min=0).pow(2).sum()


'''), ('    g = p.add_argument_group("method (ProCon)")\n', '''    p.add_argument("--margin", type=float, default=0.0,
                   help="a fork: no constraint within this distance of the anchor")
''')],
    "directions.py": [('choices=("silhouette", "refusal")', 'choices=("silhouette", "refusal", "kl")'),
                      ("def silhouette(", '''def lowest_kl(scores):
    """A fork's --select kl: the layer whose ablation moves harmless next-token distributions least."""
    return min(scores, key=lambda layer: scores[layer]["kl"])


''')],
}


def test_a_fork_passes_the_same_rules(tmp_path):
    """The two ordinary forks a line budget used to fail (a squared hinge with --margin in procon.py, a new --select
    option in directions.py) pass the layout rules, and the forked scripts still parse their flags."""
    for f in SCRIPTS + SHARED:
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    for f, edits in FORKS.items():
        text = (tmp_path / f).read_text()
        for anchor, added in edits:
            assert anchor in text, (f, anchor)
            text = text.replace(anchor, added + anchor if added.startswith(("def", "#")) else
                                (anchor + added if anchor.endswith("\n") else added), 1)
        (tmp_path / f).write_text(text)
    assert layout_problems(str(tmp_path)) == []
    for f, flags in (("procon.py", ["--margin", "0.1"]), ("directions.py", ["--select", "kl"])):
        r = subprocess.run(["python", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import {f[:-3]}; "
                            f"print({f[:-3]}.parse_args({flags!r}))"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


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


# Reference tensors of a tiny run (tests/golden/tiny_run.safetensors): directions.py's direction and Surgical's vector,
# the ACTOR patch and a ProCon adapter (warm-up, safety data) of the tiny Llama, made by the code before it moved
# (7849d6c, `REFUSAL_RECORD_GOLDEN=1 python -m pytest tests/test_layout.py -k same_seed` on a checkout of it with this
# test copied in). Compared at a tolerance, not bit for bit: another CPU's kernels (AVX2 or AVX512) or another thread
# count round the same sums otherwise, by about 1e-6 relative; a change to the arithmetic moves them by far more.
GOLDEN = os.path.join(ROOT, "tests", "golden", "tiny_run.safetensors")
RTOL, ATOL = 1e-4, 1e-6
SINCE_RECORDED = {"direction.harmless_mean", "false_refusal.harmless_mean"}  # added by issue 39 (--ablation projected)


def tiny_run(tiny_llama, tmp_path):
    """The artifacts' tensors of a seeded tiny run of directions.py, actor.py and procon.py, by name."""
    import json

    from safetensors.torch import load_file

    import actor
    import directions
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
    out = {}
    for prefix, path in (("direction", tmp_path / "d" / "direction.pt"),
                         ("false_refusal", tmp_path / "d" / "false_refusal.pt")):
        out.update({f"{prefix}.{k}": v for k, v in torch.load(path, weights_only=True).items() if torch.is_tensor(v)})
    out.update({f"patch.{k}": v for k, v in load_file(str(tmp_path / "a" / "actor_layer.safetensors")).items()})
    out.update({f"procon.{k}": v for k, v in load_file(str(tmp_path / "p" / "adapter" /
                                                           "adapter_model.safetensors")).items()})
    return {k: v.contiguous() for k, v in out.items()}


def test_same_seed_same_artifacts_as_before_the_move(tiny_llama, tmp_path):
    """The same seed gives the direction, Surgical's vector, the ACTOR patch and the ProCon adapter of the tensors
    recorded before the code moved, within RTOL (on any CPU and thread count where torch is the pinned build)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    fixture = runrecord.sha256(os.path.join(tiny_llama, "model.safetensors"))[:16]
    got = tiny_run(tiny_llama, tmp_path)
    if os.environ.get("REFUSAL_RECORD_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        save_file(got, GOLDEN, {"fixture": fixture, "torch": torch.__version__})
    with safe_open(GOLDEN, "pt") as f:
        recorded = f.metadata()
    if recorded["fixture"] != fixture:
        pytest.skip(f"the tensors were recorded on another tiny model (fixture {recorded['fixture']}, here {fixture}): "
                    "this transformers draws it otherwise")
    want = load_file(GOLDEN)
    assert sorted(got) == sorted(set(want) | SINCE_RECORDED)
    far = {k: (got[k].float() - want[k].float()).abs().max().item() for k in want
           if not torch.allclose(got[k].float(), want[k].float(), rtol=RTOL, atol=ATOL)}
    assert not far, f"moved by more than rtol {RTOL}: {far}"


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
