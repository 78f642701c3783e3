"""chat.py: prompt files in, chat-formatted token batches out (black boxes, shared by every script).

JSON, JSONL, CSV, TSV or TXT in, a list of clean prompts out (a seeded sample with --limit; every row read or the file
refused); prompts through the model's chat template (--system-prompt, --thinking); tokenizing, length-sorted batches,
and the context length checked before any work.
"""
import csv
import json
import os
import random
import sys

import torch

import cli
import loading

PROMPT_COLUMNS = ("prompt", "instruction", "goal", "Behavior", "Goal", "forbidden_prompt")


def read_records(path):
    """Rows of a JSON, JSONL, CSV or TXT file, as a list of dicts (TXT and lists of strings become {"prompt": ...}).
    Text is UTF-8; a byte-order mark is read as one. Every row is read or the file refused, naming the row: a CSV row
    with more or fewer fields than its header, a JSON object that names a key twice (JSON keeps the last in silence)."""
    cli.check_path(path)
    ext = os.path.splitext(path)[1].lower()
    twice = {}  # id of a JSON object -> (the object, kept alive so that its id stays its own; a key it names twice)

    def pairs_hook(pairs):
        obj = dict(pairs)
        if len(obj) < len(pairs):
            twice[id(obj)] = obj, next(k for i, (k, _) in enumerate(pairs) if k in (p for p, _ in pairs[:i]))
        return obj
    try:
        with open(path, encoding="utf-8-sig", newline="" if ext in (".csv", ".tsv") else None) as f:
            if ext == ".jsonl":
                rows = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line, object_pairs_hook=pairs_hook))
                        except json.JSONDecodeError as e:
                            cli.fail(f"{path}: line {i} is not valid JSON ({e.msg})")
            elif ext == ".json":
                try:
                    rows = json.load(f, object_pairs_hook=pairs_hook)
                except json.JSONDecodeError as e:
                    cli.fail(f"{path}: not valid JSON ({e.msg} at line {e.lineno})")
                if isinstance(rows, dict):  # {"data": [...]} and similar wrappers
                    lists = [v for v in rows.values() if isinstance(v, list)]
                    rows = lists[0] if len(lists) == 1 else [rows]
            elif ext in (".csv", ".tsv"):
                rows = read_csv(f, path, "\t" if ext == ".tsv" else ",")
            elif ext in (".txt", ""):
                rows = [line.rstrip("\n") for line in f if line.strip()]
            else:
                cli.fail(f"{path}: unknown file type {ext!r} (use .json, .jsonl, .csv, .tsv or .txt)")
    except UnicodeDecodeError:
        cli.fail(f"{path}: not UTF-8 text")
    except csv.Error as e:
        cli.fail(f"{path}: malformed CSV ({e})")
    if not isinstance(rows, list):
        cli.fail(f"{path}: expected a list of prompts or records")
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, str):
            r = {"prompt": r}
        if not isinstance(r, dict):
            cli.fail(f"{path}: row {i + 1} is a {type(r).__name__}, expected a string or an object")
        if id(r) in twice:
            cli.fail(f"{path}: row {i + 1} names {twice[id(r)][1]!r} twice; JSON would keep the last in silence")
        out.append(r)
    if twice:
        cli.fail(f"{path}: an object names {next(iter(twice.values()))[1]!r} twice; JSON would keep the last in "
                 "silence")
    return out


def read_csv(f, path, delimiter):
    """The rows of a CSV or TSV file as dicts keyed by its header. A row with more fields than the header (an unquoted
    comma in a prompt) or fewer (a field left out) is refused with its number (rows counted after the header, as
    every reader counts them) and the line it ends on; so is a header that names a column twice."""
    reader = csv.reader(f, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return []
    named = [h for h in header if h.strip()]
    if len(set(named)) < len(named):
        cli.fail(f"{path}: the header names column {next(h for h in named if named.count(h) > 1)!r} twice")
    rows = []
    for row in reader:
        if not row:  # a blank line, as csv.DictReader skips it
            continue
        if len(row) != len(header):
            why = "an unquoted comma or tab in a field?" if len(row) > len(header) else "a field left out?"
            cli.fail(f"{path}: row {len(rows) + 1} (ending at line {reader.line_num}) has {len(row)} fields; the "
                     f"header has {len(header)} ({why})")
        rows.append(dict(zip(header, row)))
    return rows


def text_of(value, path, row, column):
    """A field that must hold text: a string (or a number, as written); a list, an object or a bool is an error."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        cli.fail(f"{path}: row {row} has a {type(value).__name__} in column {column!r}, expected text")
    return str(value).strip()


def read_prompts(path, column=None, limit=None, seed=0):
    """Prompts from a file: the `column` field, else the first of PROMPT_COLUMNS the file has. Stripped. Every row
    gives one (the rule of the pair files): a row without the column, with it empty, or with its prompt under another
    key ends the run with the row's number."""
    rows = read_records(path)
    if not rows:
        cli.fail(f"{path}: no prompts in file")
    keys = set().union(*(r.keys() for r in rows))
    col = column or next((c for c in PROMPT_COLUMNS if c in keys), None)
    if col is None or col not in keys:
        want = repr(column) if column else "any of " + ", ".join(PROMPT_COLUMNS)
        cli.fail(f"{path}: no column {want} (columns: {', '.join(sorted(keys))}); choose one with --column")
    prompts = []
    for i, r in enumerate(rows, 1):
        prompts.append(text_of(r[col], path, i, col) if r.get(col) is not None else "")
        if not prompts[-1]:
            other = next((c for c in PROMPT_COLUMNS if c != col and str(r.get(c) or "").strip()), None)
            cli.fail(f"{path}: row {i} " + (f"holds its prompt under {other!r}, other rows under {col!r}; put every "
                                            "prompt under one key" if other else
                                            f"has an empty {col!r}" if col in r else
                                            f"has no {col!r} (it has {', '.join(map(str, r)) or 'nothing'})"))
    return sample(prompts, limit, seed)


def sample(items, limit, seed):
    """--limit in every script: a fixed, seeded sample of at most `limit` items, kept in file order (all of them
    without a limit), so that runs stay comparable."""
    if not limit or limit >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def check_groups(groups):
    """Prompt groups that a difference in means is taken between: none empty, no two the same set of prompts."""
    names = list(groups)
    for i, a in enumerate(names):
        if not groups[a]:
            cli.fail(f"the {a} prompts are empty")
        for b in names[i + 1:]:
            if set(groups[a]) == set(groups[b]):
                cli.fail(f"the {a} and {b} prompts are the same; their difference in means would be 0")


def chat_text(tokenizer, prompt, response=None):
    """One prompt as a user turn in the tokenizer's own chat template (with the model's system prompt and thinking
    setting): with the generation prompt, or followed by `response` as the assistant turn."""
    opts = getattr(tokenizer, "chat_options", {}) or {}
    msgs = ([{"role": "system", "content": opts["system"]}] if opts.get("system") else []) + \
        [{"role": "user", "content": prompt}]
    extra = {} if opts.get("thinking") is None else {"enable_thinking": opts["thinking"] == "on"}
    try:
        if response is None:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra)
        return tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False,
                                             **extra)
    except Exception as e:  # jinja's raise_exception ("System role not supported") and template errors
        what = "a system prompt" if opts.get("system") else "this conversation"
        cli.fail(f"the chat template does not take {what} ({str(e).strip().splitlines()[0][:120]})")


def format_chat(tokenizer, prompts):
    """Each prompt as one user turn in the tokenizer's own chat template, with the generation prompt added."""
    return [chat_text(tokenizer, p) for p in prompts]


def tokenize(tokenizer, texts, device, max_length=None):
    # the chat template already holds BOS and the like, so no special tokens are added again
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                     truncation=max_length is not None, max_length=max_length).to(device)


def token_lengths(tokenizer, texts):
    """Token count of each (already chat-formatted) text."""
    return [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]


def length_batches(tokenizer, texts, batch_size):
    """Index batches of texts sorted by length, so that padding is small; results are put back in order later."""
    lengths = token_lengths(tokenizer, texts)
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def check_context(model, lengths, extra_tokens=0, what="prompts"):
    """Sequences longer than the model's context, checked before any work. A prompt longer than the context by itself
    is refused on every model: past the positions it was trained on, and attention's memory grows with the square of
    the length, so that a prompt far past it ran out of memory. A prompt that fits but runs past with
    extra_tokens to generate is refused on a model with absolute position embeddings (GPT-2 style: they would index
    past its table), warned about with the count on others."""
    cfg = loading.text_config(model)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not limit or not lengths:
        return
    alone = sum(n > limit for n in lengths)
    if alone:
        cli.fail(f"{alone} of {len(lengths)} {what} run past the model's context of {limit} tokens by themselves "
                 f"(longest {max(lengths)}): shorten them or leave them out")
    lengths = [n + extra_tokens for n in lengths]
    over = sum(n > limit for n in lengths)
    if not over:
        return
    absolute = any(isinstance(m, torch.nn.Embedding) and n.split(".")[-1] in ("wpe", "embed_positions",
                                                                                 "position_embeddings")
                   for n, m in model.named_modules())
    msg = (f"{over} of {len(lengths)} {what} run past the model's context of {limit} tokens "
           f"(longest {max(lengths)}{f', with {extra_tokens} new tokens' if extra_tokens else ''})")
    if absolute:
        cli.fail(msg + "; this model's absolute positions end there: shorten them or lower the token budget")
    print(f"warning: {msg}; the model has not been trained on such positions", file=sys.stderr)


def pair_tokens(tok, prompt, answer):
    """One (prompt, answer) pair as the chat template writes it (procon.py trains on it, evaluate.py scores it):
    (token ids, how many of them are the prompt's); the answer's tokens, the template's end-of-turn marker included,
    follow."""
    prompt_text, full = chat_text(tok, prompt), chat_text(tok, prompt, answer)
    if not full.startswith(prompt_text):  # a template that rewrites earlier turns: the answer appended instead
        full = prompt_text + answer + (tok.eos_token or "")
    return tok(full, add_special_tokens=False).input_ids, len(tok(prompt_text, add_special_tokens=False).input_ids)
