"""Preference data for train.py and eval.py: load, check, apply the chat template, tokenize, batch.

Two layouts, detected row by row (README, Data formats): standard (prompt, chosen, rejected strings)
and conversational (chosen and rejected message lists, whose last, assistant message is the response
and whose shared turns before it are the prompt, else a `prompt` column: text or messages). Every
problem is a DataError whose message names the file, row and field.
"""
import contextlib
import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jinja2 import TemplateError

import cli

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# the token id columns of a tokenized split; "unscored": see `_token_ids`; "prompt_end": see
# `generation_prompt`
COLUMNS = ("prompt", "chosen", "rejected", "unscored", "prompt_end")
# status of a row
KEPT, IDENTICAL, EMPTIED = 0, 1, 2


class DataError(ValueError):
    """Bad input: one line, naming the file, row and field."""


class Pair(NamedTuple):
    """prompt: messages; chosen, rejected: one assistant message each; conversational: read from
    message lists (needs a chat template); where: "file: row N", for error messages."""
    prompt: list
    chosen: dict
    rejected: dict
    conversational: bool
    where: str


def load_rows(dataset, split):
    """Rows of a local file or folder, or of a hub dataset ("name" or "org/name"), as a
    `datasets.Dataset`; a single file serves as whatever split is asked for."""
    # slow to import; only needed here
    from datasets import Features, Value, load_dataset

    path = Path(dataset)
    suffix = path.suffix.lower()
    if (suffix in FILE_TYPES or cli.looks_local(dataset)) and not path.exists():
        raise DataError(f"{dataset}: no such file or folder")
    if path.is_file() and suffix not in FILE_TYPES:
        raise DataError(f"{dataset}: unsupported file type {path.suffix!r} "
                        f"(use {', '.join(FILE_TYPES)})")
    try:
        options = {}
        if suffix == ".csv" and path.is_file():
            # cells as text: pandas would read "42" as 42, "007" as 7, and "NA" or "None" as missing
            with open(path, newline="") as f:
                features = Features({name: Value("string") for name in next(csv.reader(f), [])})
            options = {"features": features, "keep_default_na": False}
        if path.is_file():
            return load_dataset(FILE_TYPES[suffix], data_files={split: str(path)}, split=split,
                                **options)
        return load_dataset(dataset, split=split)
    except Exception as error:
        # find the exact row that arrow choked on
        if suffix in (".json", ".jsonl"):
            rows = _json_rows(path)
            for number, row in enumerate(rows, 1):
                to_pair(row, f"{dataset}: row {number}")
            if not rows:
                raise DataError(f"{dataset}: no rows") from None
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(f"{dataset}: cannot load split {split!r}: {reason}") from None


def _json_rows(path):
    if path.suffix.lower() == ".json":
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {error.lineno}: malformed JSON ({error.msg})") from None
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: row {number}: malformed JSON ({error.msg})") from None
    return rows


def _text(value, where, field):
    if not isinstance(value, str) or not value.strip():
        problem = f"not a string ({type(value).__name__})"
        if value is None or isinstance(value, str):
            problem = "missing" if value is None else "empty"
        raise DataError(f"{where}: field '{field}' is {problem}")
    return value


def _messages(value, where, field):
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{field}[{i}]' is not a message "
                            f"({{'role': ..., 'content': ...}})")
        _text(message.get("role"), where, f"{field}[{i}].role")
        _text(message.get("content"), where, f"{field}[{i}].content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_pair(row, where):
    """One row of either layout -> a Pair."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: not an object with 'prompt', 'chosen' and 'rejected' fields")
    if not isinstance(row.get("chosen"), list) and not isinstance(row.get("rejected"), list):
        prompt, chosen, rejected = (_text(row.get(f), where, f) for f in COLUMNS[:3])
        return Pair([{"role": "user", "content": prompt}], {"role": "assistant", "content": chosen},
                    {"role": "assistant", "content": rejected}, False, where)
    chosen = _messages(row.get("chosen"), where, "chosen")
    rejected = _messages(row.get("rejected"), where, "rejected")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{field}': last message must be the assistant's "
                            f"response")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their last message")
    # no turns before the responses: the prompt has its own column, messages or a string
    prompt = chosen[:-1] or row.get("prompt")
    if not isinstance(prompt, list):
        prompt = [{"role": "user", "content": _text(prompt, where, "prompt")}]
    return Pair(_messages(prompt, where, "prompt"), chosen[-1], rejected[-1], True, where)


def read_pairs(dataset, split):
    """Every row of a split as a Pair (checked, in file order): judge.py reads prompts this way."""
    return [to_pair(row, f"{dataset}: row {i}") for i, row in enumerate(_rows(dataset, split), 1)]


def _rows(dataset, split):
    rows = load_rows(dataset, split)
    if "chosen" not in rows.column_names or "rejected" not in rows.column_names:
        raise DataError(f"{dataset}: unknown column layout {rows.column_names}: expected 'prompt', "
                        f"'chosen', 'rejected' strings, or 'chosen'/'rejected' message lists")
    if len(rows) == 0:
        raise DataError(f"{dataset}: split {split!r} has no rows")
    return rows


# ---------------------------------------------------------------- chat template and tokens

SENTINEL = "SimpoSentinel"


class EndOfTurn(NamedTuple):
    """What a chat template writes after an assistant message's content: all of it (`suffix`,
    Gemma-2 "<end_of_turn>\\n"; "" if the template could not say), and the special token that ends
    the turn (`terminator`: Llama-3 <|eot_id|>, Gemma-2 <end_of_turn>; None if none)."""
    terminator: str | None
    suffix: str


def _templated(tokenizer, conversation):
    """One conversation through the chat template, as text; "" with no template or when it fails."""
    if tokenizer.chat_template is not None:
        with contextlib.suppress(TemplateError):
            return tokenizer.apply_chat_template(conversation, tokenize=False)
    return ""


def end_of_turn(tokenizer):
    """Read from the template, not from a table of model names: what follows a sentinel reply. The
    terminator is the first special token there. Without one, EOS ends each response."""
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    text = _templated(tokenizer, conversation)
    if SENTINEL not in text:
        return EndOfTurn(None, "")
    suffix = text[text.rindex(SENTINEL) + len(SENTINEL):]
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    found = sorted((suffix.index(token), -len(token), token)
                   for token in specials | {tokenizer.eos_token} if token and token in suffix)
    return EndOfTurn(found[0][2] if found else None, suffix)


def prompt_head(tokenizer):
    """The ids a truncated prompt keeps at its start: what the template writes before a lone user
    message (BOS, a default system turn, the user's role header); without a template, BOS."""
    text = _templated(tokenizer, [{"role": "user", "content": SENTINEL}])
    if SENTINEL not in text:
        return [tokenizer.bos_token_id]
    return tokenizer(text[:text.index(SENTINEL)], add_special_tokens=False)["input_ids"]


def _render(tokenizer, conversations, pairs, **options):
    """The template applied to many conversations in one call; on an error, the row that fails
    (Gemma-2's template refuses a system turn)."""
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False, **options)
    except TemplateError as error:
        for conversation, pair in zip(conversations, pairs, strict=True):
            try:
                tokenizer.apply_chat_template(conversation, tokenize=False, **options)
            except TemplateError as row_error:
                raise DataError(f"{pair.where}: the chat template fails on this row: "
                                f"{row_error}") from None
        raise DataError(f"{pairs[0].where}: the chat template fails: {error}") from None


def _up_to_end_of_turn(text, prompt_text, response, end):
    """(The conversation cut right after the response's terminator, whether EOS must follow): what
    follows (Gemma-2's "\\n") is never generated; scoring it would dilute the average log-prob."""
    # a template that rewrites earlier turns: the raw response after the prompt, as generated
    if not text.startswith(prompt_text):
        text = prompt_text + response["content"] + end.suffix
    at = text.rfind(end.terminator, len(prompt_text)) if end.terminator else -1
    # no terminator: the policy still has to learn to stop, so EOS follows
    if at < 0:
        return text.removesuffix(end.suffix) if end.suffix.strip() else text.rstrip(), True
    return text[:at + len(end.terminator)], False


def generation_prompt_ids(tokenizer, pairs):
    """Each pair's prompt as a model reads it before it writes a reply, untruncated: rendered alone
    with the template's generation prompt and tokenized as `_token_ids` tokenizes conversations;
    without a template, the prompt's text after BOS."""
    if not pairs:
        return []
    if tokenizer.chat_template is None:
        return tokenizer([pair.prompt[-1]["content"] for pair in pairs])["input_ids"]
    texts = _render(tokenizer, [pair.prompt for pair in pairs], pairs, add_generation_prompt=True)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _token_ids(tokenizer, pairs, end):
    """(prompt, chosen, rejected, unscored) ids of each pair, untruncated, in batched calls. With a
    template each conversation is tokenized whole, as the model reads it (no special tokens added:
    the template writes BOS), the prompt ending where the generation prompt ends; without one
    (standard layout only), the prompt gets BOS and each response is tokenized alone (as TRL)."""
    if not pairs:
        return []
    eos = [tokenizer.eos_token_id]
    n = len(pairs)
    if tokenizer.chat_template is None:
        prompts = generation_prompt_ids(tokenizer, pairs)
        texts = [pair.chosen["content"] for pair in pairs] + [p.rejected["content"] for p in pairs]
        responses = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(prompts[i], responses[i] + eos, responses[n + i] + eos, [0, 0]) for i in range(n)]
    # [chosen..., rejected...]
    sides = pairs * 2
    responses = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    prompt_texts = _render(tokenizer, [pair.prompt for pair in pairs], pairs,
                           add_generation_prompt=True) * 2
    conversations = [pair.prompt + [reply] for pair, reply in zip(sides, responses, strict=True)]
    cut = [_up_to_end_of_turn(text, prompt_text, response, end) for text, prompt_text, response
           in zip(_render(tokenizer, conversations, sides), prompt_texts, responses, strict=True)]
    texts = [text for text, _ in cut]
    eos_follows = [follows for _, follows in cut]
    encoded = tokenizer(texts, add_special_tokens=False)
    ids = encoded["input_ids"]
    # a Python tokenizer knows no characters: the prompts tokenized on their own
    if encoded.encodings is None:
        prompt_ids = tokenizer(prompt_texts[:n], add_special_tokens=False)["input_ids"] * 2
        starts = [_shared_length(p, full) for p, full in zip(prompt_ids, ids, strict=True)]
    else:
        starts = []
        # the token holding the response's first character: one that spans the boundary
        # (SentencePiece's "▁Hello") belongs to the response, as the model reads it
        for i, (text, prompt_text) in enumerate(zip(texts, prompt_texts, strict=True)):
            chars = range(len(prompt_text), len(text))
            tokens = (encoded.char_to_token(i, char) for char in chars)
            starts.append(next((token for token in tokens if token is not None), len(ids[i])))
    result = []
    for i in range(n):
        chosen = ids[i]
        rejected = ids[n + i]
        # The prompt both sides share. Prompt tokens past it are read but not scored: on Mistral,
        # one side's first token can swallow the prompt's last "]" ("][") while the other keeps a
        # bare "]".
        shared = _shared_length(chosen[:starts[i]], rejected[:starts[n + i]])
        unscored = [starts[i] - shared, starts[n + i] - shared]
        result.append((chosen[:shared], chosen[shared:] + eos * eos_follows[i],
                       rejected[shared:] + eos * eos_follows[n + i], unscored))
    return result


def _shared_length(a, b):
    # the usual case, compared in C
    if a == b:
        return len(a)
    different = (n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return next(different, min(len(a), len(b)))


def _truncate(prompt, responses, head, max_length, max_prompt_length):
    """Fit a pair into max_length: first the prompt loses the start of its text, down to
    max_prompt_length, then the responses lose their end. A pair that fits keeps all its prompt."""
    if len(prompt) + max(map(len, responses)) <= max_length:
        return prompt, responses
    if len(prompt) > max_prompt_length:
        # The end holds the question and the assistant's header; the template's head stays, in at
        # most half the room, so the model still reads a conversation's start (a lone BOS would not
        # do: ChatML's BOS <|im_start|> opens every turn).
        keep = min(_shared_length(prompt, head), max_prompt_length // 2)
        prompt = prompt[:keep] + prompt[len(prompt) - max_prompt_length + keep:]
    return prompt, [ids[:max(0, max_length - len(prompt))] for ids in responses]


def generation_prompt(example):
    """The ids a model reads before it writes a response: the prompt rendered alone (see
    `generation_prompt_ids`), rebuilt from the shared prompt and "prompt_end" ([n, *ids]: the last n
    ids of the prompt replaced by ids). A truncated prompt's lacks the very ids the prompt lacks:
    the model reads the text it trained on."""
    prompt = list(example["prompt"])
    drop, *tail = example["prompt_end"]
    return prompt[:len(prompt) - drop] + tail


# ---------------------------------------------------------------- a whole split, batched and cached

def tokenize_batch(batch, indices, tokenizer, source, end, head, max_length, max_prompt_length):
    """`datasets.map(batched=True)` function: rows in, token ids and a status per row out."""
    pairs = [to_pair(dict(zip(batch, values, strict=True)), f"{source}: row {i + 1}")
             for values, i in zip(zip(*batch.values(), strict=True), indices, strict=True)]
    for pair in pairs:
        if pair.conversational and tokenizer.chat_template is None:
            raise DataError(f"{pair.where}: conversational data needs a chat template, and "
                            f"tokenizer has none (pass --chat-template)")
    # chosen == rejected teaches nothing: its loss is the constant log σ(−γ), with no gradient
    identical = [pair.chosen["content"] == pair.rejected["content"] for pair in pairs]
    different = [pair for pair, same in zip(pairs, identical, strict=True) if not same]
    token_ids = iter(_token_ids(tokenizer, different, end))
    alone = iter(generation_prompt_ids(tokenizer, different))
    out = {name: [] for name in (*COLUMNS, "status", "truncated")}
    for same in identical:
        row = ([], [], [], [0, 0], [], IDENTICAL, False)
        if not same:
            whole, *untruncated, unscored = next(token_ids)
            # On Mistral both sides' first tokens can swallow the prompt's last "]": the prompt
            # rendered alone ends in ids neither conversation has. Kept as what differs from the
            # shared prompt (an id or two; a copy would add a prompt's ids, ~40% of a pair's).
            generation = next(alone)
            shared = _shared_length(whole, generation)
            prompt_end = [len(whole) - shared, *generation[shared:]]
            prompt, responses = _truncate(whole, untruncated, head, max_length, max_prompt_length)
            row = ([], [], [], unscored, [], EMPTIED, False)
            # a response left with no ids past the prompt's text has nothing to score
            if all(len(ids) > n for ids, n in zip(responses, unscored, strict=True)):
                truncated = [prompt, *responses] != [whole, *untruncated]
                row = (prompt, *responses, unscored, prompt_end, KEPT, truncated)
        for name, value in zip(out, row, strict=True):
            out[name].append(value)
    return out


def _tokenizer_state(tokenizer):
    """All that decides the ids, as text (files as loaded, Python-side settings such as
    `split_special_tokens`, library versions): hashing the object itself takes 10 s on Gemma-2."""
    import tokenizers
    import transformers
    where = ("name_or_path", "is_local", "local_files_only", "vocab_file", "tokenizer_file")
    settings = {k: v for k, v in tokenizer.init_kwargs.items() if k not in where}
    python_side = repr((type(tokenizer).__name__, sorted(settings.items(), key=str),
                        tokenizer.split_special_tokens, transformers.__version__,
                        tokenizers.__version__))
    if not tokenizer.is_fast:
        return python_side + repr(tokenizer.get_vocab())
    backend = tokenizer.backend_tokenizer
    # state left by earlier padded calls; transformers sets it again on each call
    backend.no_padding()
    backend.no_truncation()
    return python_side + backend.to_str()


def tokenize_split(tokenizer, dataset, split, max_length, max_prompt_length):
    """Every row of one split, tokenized, with a status per row: (a `datasets.Dataset`, its cache
    files, whether it was read from them). `datasets` caches it under a fingerprint of all that
    decides it, so a run with the same inputs reads it back and a change in any tokenizes anew."""
    from datasets import Features, List, Value
    from datasets.fingerprint import Hasher

    rows = _rows(dataset, split)
    end = end_of_turn(tokenizer)
    head = prompt_head(tokenizer)
    # EOS too: it ends a response when the template writes no terminator
    fingerprint = Hasher.hash([rows._fingerprint, _tokenizer_state(tokenizer),
                               tokenizer.chat_template, tokenizer.eos_token_id, repr(end), head,
                               str(dataset), max_length, max_prompt_length,
                               Path(__file__).read_text()])
    # 4 bytes per token id (Python ints in lists take 70)
    features = Features({**{name: List(Value("int32")) for name in COLUMNS},
                         "status": Value("int8"), "truncated": Value("bool")})
    settings = dict(tokenizer=tokenizer, source=dataset, end=end, head=head, max_length=max_length,
                    max_prompt_length=max_prompt_length)
    options = dict(batched=True, with_indices=True, remove_columns=rows.column_names,
                   features=features, new_fingerprint=fingerprint, fn_kwargs=settings)
    calls = []

    # Read from the cache when tokenize_batch never ran. (A file's time cannot tell: Linux stamps
    # files from a clock that lags time.time() by up to a few milliseconds.)
    def tokenize(*args, **kwargs):
        calls.append(1)
        return tokenize_batch(*args, **kwargs)

    tokenized = rows.map(tokenize, desc=f"tokenizing {dataset}:{split}", **options)
    files = [f["filename"] for f in tokenized.cache_files]
    from_cache = not calls
    # Cached ids must still be what the tokenizer gives: a few rows tokenized afresh say whether a
    # setting the fingerprint cannot see has changed them.
    sample = range(min(8, len(rows)))
    if from_cache and tokenize_batch(rows[:8], sample, **settings) != tokenized[:8]:
        tokenized = rows.map(tokenize_batch, desc=f"tokenizing {dataset}:{split} again",
                             load_from_cache_file=False, **options)
        from_cache = False
    return tokenized, files, from_cache


class Examples:
    """Tokenized pairs, in a given order, as numpy arrays over Arrow data (4 bytes per token id).
    `examples[i]` is {"prompt", "chosen", "rejected", "unscored", "prompt_end"}: lists of ids,
    built for that pair ("unscored": how many leading ids of chosen and rejected are prompt text,
    read, not scored; "prompt_end": see `generation_prompt`)."""

    def __init__(self, columns, rows):
        # name -> (ids of all rows end to end, where each row starts)
        self.columns = columns
        # positions of these pairs among those rows
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def lengths(self, name):
        return np.diff(self.columns[name][1])[self.rows]

    def fingerprint(self):
        """sha256 of these pairs' lengths and ids, in order, however the Arrow data is laid out: a
        resume must see the very same training pairs. Not "prompt_end": only sampling reads it."""
        digest = hashlib.sha256()
        for name, (ids, starts) in self.columns.items():
            if name == "prompt_end":
                continue
            digest.update(self.lengths(name).astype(np.int64))
            for row in self.rows:
                digest.update(np.ascontiguousarray(ids[starts[row]:starts[row + 1]], np.int32))
        return digest.hexdigest()[:16]

    def pair_digests(self):
        """One sha256 per pair of its prompt, chosen and rejected ids: the same pair, tokenized the
        same way, from any file or split (eval.py: were these pairs trained on?)."""
        return [hashlib.sha256(repr([pair[name] for name in COLUMNS[:3]]).encode()).hexdigest()
                for pair in self[:]]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        # int(): torch.randperm's 0-d tensors index too
        row = self.rows[int(i)]
        return {name: ids[starts[row]:starts[row + 1]].tolist()
                for name, (ids, starts) in self.columns.items()}


def longest(*parts):
    """The most tokens of one sequence, prompt + the longer response, over these Examples (1 if
    none): the length packing.Layout and the start-up check are built for."""
    return max([1] + [int((part.lengths("prompt") + np.maximum(part.lengths("chosen"),
                                                               part.lengths("rejected"))).max())
                      for part in parts if len(part)])


def _columns(tokenized):
    """What Examples reads: name -> (ids of all rows end to end, where each row starts)."""
    arrays = {name: tokenized.data.column(name).combine_chunks() for name in COLUMNS}
    return {name: (a.values.to_numpy(), a.offsets.to_numpy()) for name, a in arrays.items()}


@dataclass
class Summary:
    """What load_examples kept and left out, per part ("train", "held-out"), and token lengths."""
    # part -> {"pairs": kept, "identical": n, "emptied": n, "truncated": n kept with their prompt
    # or a response cut}
    counts: dict
    # "prompt" / "chosen" / "rejected" -> {"mean", "p50", "p95", "max"}; {} with no pairs
    lengths: dict
    # where `datasets` keeps the tokenized rows
    cache_files: list
    # True when nothing was tokenized this time
    from_cache: bool

    def skipped(self, part):
        return self.counts[part]["identical"] + self.counts[part]["emptied"]

    def __str__(self):
        total = {key: sum(part[key] for part in self.counts.values())
                 for key in ("identical", "emptied", "truncated")}
        lines = [f"{self.counts['train']['pairs']} training pairs, "
                 f"{self.counts['held-out']['pairs']} held-out, "
                 f"{total['emptied']} skipped (response truncated to nothing), "
                 f"{total['identical']} left out (chosen and rejected identical), "
                 f"{total['truncated']} truncated but kept"]
        if self.lengths:
            lines.append(f"  {'tokens':10}{'mean':>8}{'p50':>8}{'p95':>8}{'max':>8}")
            for name, stats in self.lengths.items():
                quantiles = "".join(f"{stats[k]:>8d}" for k in ("p50", "p95", "max"))
                lines.append(f"  {name:10}{stats['mean']:>8.1f}{quantiles}")
        where = ", ".join(self.cache_files) or "not cached (in-memory data)"
        done = "read from the cache" if self.from_cache else "tokenized; cached"
        return "\n".join([*lines, f"  {done}: {where}"])


def load_examples(tokenizer, dataset, split, eval_split=None, eval_fraction=0.0, seed=0,
                  max_length=2048, max_prompt_length=1800):
    """Tokenized (train, held-out) examples and a Summary of them, for train.py and eval.py."""
    if eval_split and Path(dataset).is_file():
        raise DataError(f"{dataset}: a single file has no separate {eval_split!r} split: "
                        f"use --eval-fraction, or a folder with train and test files")
    limits = (max_length, max_prompt_length)
    tokenized, cache_files, from_cache = tokenize_split(tokenizer, dataset, split, *limits)
    parts = {"train": (tokenized, np.arange(len(tokenized))), "held-out": (tokenized, np.arange(0))}
    if eval_split:
        held_out, files, cached = tokenize_split(tokenizer, dataset, eval_split, *limits)
        parts["held-out"] = (held_out, np.arange(len(held_out)))
        cache_files = cache_files + files
        from_cache = from_cache and cached
    # a fixed, seeded slice of the training split
    elif eval_fraction > 0:
        order = list(range(len(tokenized)))
        random.Random(seed).shuffle(order)
        cut = max(1, int(len(tokenized) * eval_fraction))
        parts = {"train": (tokenized, np.array(order[cut:])),
                 "held-out": (tokenized, np.array(order[:cut]))}
    # train and held-out may share one table: its ids are read once
    tables = {id(table): table for table, _ in parts.values()}
    columns = {key: _columns(table) for key, table in tables.items()}
    counts = {}
    examples = {}
    for part, (table, rows) in parts.items():
        status = table.data.column("status").to_numpy()[rows]
        counts[part] = {"pairs": int((status == KEPT).sum()),
                        "identical": int((status == IDENTICAL).sum()),
                        "emptied": int((status == EMPTIED).sum()),
                        "truncated": int(table.data.column("truncated").to_numpy()[rows].sum())}
        examples[part] = Examples(columns[id(table)], rows[status == KEPT])
    lengths = {}
    if counts["train"]["pairs"] + counts["held-out"]["pairs"]:
        for name in COLUMNS[:3]:
            values = np.concatenate([part.lengths(name) for part in examples.values()])
            p50, p95 = np.percentile(values, [50, 95], method="nearest")
            lengths[name] = {"mean": float(values.mean()), "p50": int(p50), "p95": int(p95),
                             "max": int(values.max())}
    summary = Summary(counts, lengths, cache_files, from_cache)
    return examples["train"], examples["held-out"], summary
