"""Preference data for train.py and eval.py: load, check, apply the chat template, tokenize, batch.

Two layouts are read, detected row by row:
  standard        {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"chosen": [messages], "rejected": [messages],
                   "prompt": str | [messages] | absent}
                  where a message is {"role": ..., "content": ...}. The response is the last
                  (assistant) message; turns before it, shared by chosen and rejected, are the
                  prompt. This covers HuggingFaceH4/ultrafeedback_binarized and
                  princeton-nlp/llama3-ultrafeedback-armorm.
Every problem is a DataError whose message names the file, row and field.
"""
import csv
import hashlib
import json
import random
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jinja2 import TemplateError

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Bad input: one line, naming the file, row and field."""


class Pair(NamedTuple):
    # messages
    prompt: list
    # the preferred response, one assistant message
    chosen: dict
    rejected: dict
    # read from message lists (needs a chat template)
    conversational: bool
    # "file: row N", for error messages
    where: str


def load_rows(dataset, split):
    """Rows of a local file or folder, or of a hub dataset, as a `datasets.Dataset`."""
    # slow to import; only needed here
    from datasets import load_dataset

    path = Path(dataset)
    suffix = path.suffix.lower()
    # hub ids are "name" or "org/name"
    looks_local = (suffix in FILE_TYPES or dataset.startswith((".", "/", "~"))
                   or dataset.count("/") > 1 or (path.parent != Path(".") and path.parent.is_dir()))
    if looks_local and not path.exists():
        raise DataError(f"{dataset}: no such file or folder")
    if path.is_file() and suffix not in FILE_TYPES:
        raise DataError(f"{dataset}: unsupported file type {path.suffix!r} "
                        f"(use {', '.join(FILE_TYPES)})")
    try:
        # a single file serves as whatever split is asked for
        if path.is_file():
            return load_dataset(FILE_TYPES[suffix], data_files={split: str(path)}, split=split,
                                **(_csv_as_text(path) if suffix == ".csv" else {}))
        return load_dataset(dataset, split=split)
    except Exception as error:
        # find the exact row that arrow choked on
        if suffix in (".json", ".jsonl"):
            rows = _json_rows(path)
            for index, row in enumerate(rows):
                to_pair(row, f"{dataset}: row {index + 1}")
            if not rows:
                raise DataError(f"{dataset}: no rows") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{dataset}: cannot load split {split!r}: {reason}") from None


def _csv_as_text(path):
    """CSV cells as the text they are: pandas would turn an answer "42" into 42 and "007" into 7,
    and "NA" or "None" into a missing value."""
    from datasets import Features, Value
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    features = Features({name: Value("string") for name in header})
    return {"features": features, "keep_default_na": False}


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
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        chosen = _messages(row.get("chosen"), where, "chosen")
        rejected = _messages(row.get("rejected"), where, "rejected")
        for field, messages in (("chosen", chosen), ("rejected", rejected)):
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: field '{field}': last message must be the assistant's "
                                f"response")
        if chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their last "
                            f"message")
        prompt = chosen[:-1]
        # the prompt is not inside the conversations: it has its own column
        if not prompt:
            value = row.get("prompt")
            if isinstance(value, list):
                prompt = _messages(value, where, "prompt")
            else:
                prompt = [{"role": "user", "content": _text(value, where, "prompt")}]
        return Pair(prompt, chosen[-1], rejected[-1], True, where)
    prompt = _text(row.get("prompt"), where, "prompt")
    chosen, rejected = (_text(row.get(field), where, field) for field in ("chosen", "rejected"))
    return Pair([{"role": "user", "content": prompt}], {"role": "assistant", "content": chosen},
                {"role": "assistant", "content": rejected}, False, where)


def read_pairs(dataset, split):
    """Every row of a split as a Pair (checked, in file order): judge.py reads prompts this way."""
    rows = _checked_rows(dataset, split)
    return [to_pair(row, f"{dataset}: row {i + 1}") for i, row in enumerate(rows)]


def _checked_rows(dataset, split):
    rows = load_rows(dataset, split)
    if "chosen" not in rows.column_names or "rejected" not in rows.column_names:
        raise DataError(f"{dataset}: unknown column layout {rows.column_names}: expected 'prompt', "
                        f"'chosen', 'rejected' strings, or 'chosen'/'rejected' message lists")
    if len(rows) == 0:
        raise DataError(f"{dataset}: split {split!r} has no rows")
    return rows


# ---------------------------------------------------------------- chat template and tokens

class EndOfTurn(NamedTuple):
    """What a chat template writes after an assistant message's content."""
    # the special token that ends the turn (Llama-3 <|eot_id|>, Gemma-2 <end_of_turn>)
    terminator: str | None
    # all of it (Gemma-2: "<end_of_turn>\n"); "" if the template could not say
    suffix: str


def end_of_turn(tokenizer):
    """Read from the template itself, not from a table of model names: template a conversation whose
    reply is a sentinel and look at what follows it. The terminator is the first special token
    there."""
    # plain text: EOS ends each response
    if tokenizer.chat_template is None:
        return EndOfTurn(None, "")
    sentinel = "SimpoSentinelReply"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sentinel}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except TemplateError:
        return EndOfTurn(None, "")
    if sentinel not in text:
        return EndOfTurn(None, "")
    suffix = text[text.rindex(sentinel) + len(sentinel):]
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    found = sorted((suffix.index(token), -len(token), token)
                   for token in specials | {tokenizer.eos_token} if token and token in suffix)
    return EndOfTurn(found[0][2] if found else None, suffix)


def _render(tokenizer, conversations, pairs, **options):
    """The template applied to many conversations in one call; on an error, the row that fails."""
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False, **options)
    # e.g. Gemma-2's template refuses a system turn
    except TemplateError as error:
        for conversation, pair in zip(conversations, pairs, strict=True):
            try:
                tokenizer.apply_chat_template(conversation, tokenize=False, **options)
            except TemplateError as row_error:
                raise DataError(f"{pair.where}: the chat template fails on this row: "
                                f"{row_error}") from None
        raise DataError(f"{pairs[0].where}: the chat template fails: {error}") from None


def _up_to_end_of_turn(text, prompt_text, response, end):
    """The templated conversation cut right after the response's terminator (what follows, e.g.
    Gemma-2's "\\n", is never generated: scoring it would dilute the average log-prob). True if EOS
    must follow."""
    # a template that rewrites earlier turns: the raw response after the prompt, as the model
    # would generate it
    if not text.startswith(prompt_text):
        text = prompt_text + response["content"] + end.suffix
    at = text.rfind(end.terminator, len(prompt_text)) if end.terminator else -1
    # no terminator: the policy still has to learn to stop, so EOS follows
    if at < 0:
        return text.removesuffix(end.suffix) if end.suffix.strip() else text.rstrip(), True
    return text[:at + len(end.terminator)], False


def _first_response_token(encoded, i, text, boundary):
    """Index of the token holding the response's first character: a token that spans the
    prompt/response boundary (SentencePiece's "▁Hello") is part of the response, as the model reads
    it."""
    for char in range(boundary, len(text)):
        token = encoded.char_to_token(i, char)
        if token is not None:
            return token
    return len(encoded["input_ids"][i])


def _token_ids(tokenizer, pairs, end):
    """(prompt, chosen, rejected) ids of each pair, not yet truncated, tokenized in batched calls.

    With a chat template, each whole conversation is tokenized as the model reads it (no special
    tokens added: the template writes BOS, and another is the double BOS of Llama-3), and the prompt
    ends where the generation prompt ends. Without one (standard layout only), the prompt gets the
    tokenizer's BOS and each response is tokenized on its own, as TRL does."""
    eos = [tokenizer.eos_token_id]
    if tokenizer.chat_template is None:
        prompts = tokenizer([pair.prompt[-1]["content"] for pair in pairs])["input_ids"]
        texts = [pair.chosen["content"] for pair in pairs] + [p.rejected["content"] for p in pairs]
        responses = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(prompt, chosen + eos, rejected + eos, [0, 0]) for prompt, chosen, rejected
                in zip(prompts, responses[:len(pairs)], responses[len(pairs):], strict=True)]
    prompt_texts = _render(tokenizer, [pair.prompt for pair in pairs], pairs,
                           add_generation_prompt=True)
    # [chosen..., rejected...]
    sides = [(pair, prompt_text, getattr(pair, side)) for side in ("chosen", "rejected")
             for pair, prompt_text in zip(pairs, prompt_texts, strict=True)]
    conversations = _render(tokenizer, [pair.prompt + [response] for pair, _, response in sides],
                            [pair for pair, _, _ in sides])
    cut = [_up_to_end_of_turn(text, prompt_text, response, end)
           for text, (_, prompt_text, response) in zip(conversations, sides, strict=True)]
    texts = [text for text, _ in cut]
    add_eos = [eos_follows for _, eos_follows in cut]
    encoded = tokenizer(texts, add_special_tokens=False)
    ids = encoded["input_ids"]
    # a Python tokenizer knows no characters: tokenize the prompts on their own
    if encoded.encodings is None:
        prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"] * 2
        starts = [_shared_length(p, full) for p, full in zip(prompt_ids, ids, strict=True)]
    else:
        starts = [_first_response_token(encoded, i, text, len(prompt_text))
                  for i, (text, (_, prompt_text, _)) in enumerate(zip(texts, sides, strict=True))]
    result = []
    n = len(pairs)
    for i in range(n):
        chosen = ids[i]
        rejected = ids[n + i]
        # the prompt both sides share
        cut = _shared_length(chosen[:starts[i]], rejected[:starts[n + i]])
        # Prompt tokens past the shared ones are read but not scored: on Mistral, one side's first
        # token can swallow the prompt's last "]" ("][") while the other side keeps a bare "]".
        unscored = [starts[i] - cut, starts[n + i] - cut]
        result.append((chosen[:cut], chosen[cut:] + eos * add_eos[i],
                       rejected[cut:] + eos * add_eos[n + i], unscored))
    return result


def _shared_length(a, b):
    # the usual case, compared in C
    if len(a) == len(b) and a == b:
        return len(a)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _truncate(prompt, responses, bos_id, max_length, max_prompt_length):
    """Fit a pair into max_length: first the prompt loses its start (its end holds the question; BOS
    stays), down to max_prompt_length, then the responses lose their end. A pair that fits keeps its
    whole prompt."""
    if len(prompt) + max(map(len, responses)) <= max_length:
        return prompt, responses
    if len(prompt) > max_prompt_length:
        bos = prompt[:1] if prompt[0] == bos_id else []
        prompt = bos + prompt[len(prompt) - max_prompt_length + len(bos):]
    return prompt, [ids[:max(0, max_length - len(prompt))] for ids in responses]


def generation_prompt(example):
    """The prompt's ids as a model reads them before it writes a response: the shared prompt and the
    side whose tokens hold more of the prompt's text (see `_token_ids`)."""
    chosen, rejected = example.get("unscored", (0, 0))
    return list(example["prompt"]) + list(example["chosen"][:chosen] if chosen >= rejected
                                          else example["rejected"][:rejected])


# ---------------------------------------------------------------- a whole split, batched and cached

# status of a row
KEPT, IDENTICAL, EMPTIED = 0, 1, 2
REASONS = {IDENTICAL: "identical", EMPTIED: "emptied"}


def tokenize_batch(batch, indices, tokenizer, source, end, max_length, max_prompt_length):
    """`datasets.map(batched=True)` function: rows in, token ids and a status per row out."""
    pairs = [to_pair(dict(zip(batch, values, strict=True)), f"{source}: row {i + 1}")
             for values, i in zip(zip(*batch.values(), strict=True), indices, strict=True)]
    if tokenizer.chat_template is None:
        for pair in pairs:
            if pair.conversational:
                raise DataError(f"{pair.where}: conversational data needs a chat template, and "
                                f"tokenizer has none (pass --chat-template)")
    # chosen == rejected teaches nothing: its loss is the constant log σ(−γ), with no gradient at
    # all
    identical = [pair.chosen["content"] == pair.rejected["content"] for pair in pairs]
    different = [pair for pair, same in zip(pairs, identical, strict=True) if not same]
    token_ids = iter(_token_ids(tokenizer, different, end))
    out = {name: [] for name in ("prompt", "chosen", "rejected", "unscored", "status", "truncated")}
    for same in identical:
        prompt, responses, unscored, status, truncated = [], [[], []], [0, 0], IDENTICAL, False
        if not same:
            prompt, *untruncated, unscored = next(token_ids)
            prompt, responses = _truncate(prompt, untruncated, tokenizer.bos_token_id, max_length,
                                          max_prompt_length)
            kept = all(len(ids) > n for ids, n in zip(responses, unscored, strict=True))
            status = KEPT if kept else EMPTIED
            truncated = kept and list(map(len, responses)) != list(map(len, untruncated))
            prompt, responses = (prompt, responses) if kept else ([], [[], []])
        for name, value in zip(out, (prompt, *responses, unscored, status, truncated), strict=True):
            out[name].append(value)
    return out


def _tokenizer_state(tokenizer):
    """Everything that decides the token ids, as text: the tokenizer's files as loaded, its
    Python-side settings (`split_special_tokens` changes the ids, not the files) and the library
    versions. (Hashing the tokenizer object itself, as `datasets` would, takes 10 s for Gemma-2.)"""
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
    """Every row of one split, tokenized, as a `datasets.Dataset` with a status per row.

    `datasets` keeps the result in its cache, next to the Arrow copy of the data
    (~/.cache/huggingface/ datasets, or $HF_DATASETS_CACHE), under a fingerprint of everything that
    decides it: the data, the tokenizer, its chat template, the length limits and this file. The
    next run with the same inputs reads it back instead of tokenizing again; a change in any of them
    tokenizes anew."""
    from datasets import Features, List, Value
    from datasets.fingerprint import Hasher

    rows = _checked_rows(dataset, split)
    end = end_of_turn(tokenizer)
    # EOS and BOS too: EOS ends a response when the template writes no terminator, BOS survives
    # truncation.
    fingerprint = Hasher.hash([rows._fingerprint, _tokenizer_state(tokenizer),
                               tokenizer.chat_template, tokenizer.eos_token_id,
                               tokenizer.bos_token_id, repr(end), str(dataset), max_length,
                               max_prompt_length, Path(__file__).read_text()])
    # 4 bytes per token id (Python ints in lists take 70)
    ids = List(Value("int32"))
    features = Features({"prompt": ids, "chosen": ids, "rejected": ids, "unscored": ids,
                         "status": Value("int8"), "truncated": Value("bool")})
    started = time.time()
    settings = dict(tokenizer=tokenizer, source=dataset, end=end, max_length=max_length,
                    max_prompt_length=max_prompt_length)
    options = dict(batched=True, with_indices=True, remove_columns=rows.column_names,
                   features=features, new_fingerprint=fingerprint, fn_kwargs=settings)
    tokenized = rows.map(tokenize_batch, desc=f"tokenizing {dataset}:{split}", **options)
    files = [f["filename"] for f in tokenized.cache_files]
    from_cache = bool(files) and all(Path(f).stat().st_mtime < started for f in files)
    # Cached ids must still be what the tokenizer gives: a few rows tokenized afresh say whether a
    # setting the fingerprint cannot see has changed them.
    sample = range(min(8, len(rows)))
    if from_cache and tokenize_batch(rows[:8], sample, **settings) != tokenized[:8]:
        tokenized = rows.map(tokenize_batch, desc=f"tokenizing {dataset}:{split} again",
                             load_from_cache_file=False, **options)
        from_cache = False
    return tokenized, files, from_cache


class Examples:
    """Tokenized pairs as numpy arrays over Arrow data (4 bytes per token id), in a given order.
    `examples[i]` is {"prompt", "chosen", "rejected", "unscored"}: lists of ids, built for that pair
    only ("unscored": how many leading ids of chosen and rejected are prompt text, read but not
    scored)."""

    def __init__(self, columns, rows):
        # name -> (ids of all rows end to end, where each row starts)
        self.columns = columns
        # positions of these pairs among those rows
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def fingerprint(self):
        """sha256 of the token ids of these pairs, in order, read in place: a resume must see the
        very same training pairs (however the Arrow data happens to be laid out)."""
        digest = hashlib.sha256()
        for ids, starts in self.columns.values():
            # the lengths, then the ids
            digest.update(np.diff(starts)[self.rows].astype(np.int64))
            for row in self.rows:
                row_ids = ids[starts[row]:starts[row + 1]]
                digest.update(np.ascontiguousarray(row_ids, dtype=np.int32))
        return digest.hexdigest()[:16]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        # int(): torch.randperm's 0-d tensors index too
        row = self.rows[int(i)]
        return {name: ids[starts[row]:starts[row + 1]].tolist()
                for name, (ids, starts) in self.columns.items()}


def _columns(tokenized):
    columns = {}
    for name in ("prompt", "chosen", "rejected", "unscored"):
        array = tokenized.data.column(name).combine_chunks()
        columns[name] = (array.values.to_numpy(), array.offsets.to_numpy())
    return columns


class Summary:
    """What load_examples kept and left out, per part ("train", "held-out"), and token lengths."""

    def __init__(self, counts, lengths, cache_files, from_cache):
        # part -> {"pairs": kept, "identical": n, "emptied": n, "truncated": n}
        self.counts = counts
        # "prompt" / "chosen" / "rejected" -> {"mean", "p50", "p95", "max"}
        self.lengths = lengths
        # where `datasets` keeps the tokenized rows
        self.cache_files = cache_files
        # True when nothing was tokenized this time
        self.from_cache = from_cache

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
        lines.append(f"  {done}: {where}")
        return "\n".join(lines)


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
        cache_files, from_cache = cache_files + files, from_cache and cached
    # a fixed, seeded slice of the training split
    elif eval_fraction > 0:
        order = list(range(len(tokenized)))
        random.Random(seed).shuffle(order)
        cut = max(1, int(len(tokenized) * eval_fraction))
        parts = {"train": (tokenized, np.array(order[cut:])),
                 "held-out": (tokenized, np.array(order[:cut]))}
    examples, counts, lengths = {}, {}, {"prompt": [], "chosen": [], "rejected": []}
    columns = {}
    for part, (table, rows) in parts.items():
        # train and held-out may share one table
        columns.setdefault(id(table), _columns(table))
        status = table.data.column("status").to_numpy()[rows]
        truncated = table.data.column("truncated").to_numpy()[rows]
        kept = rows[status == KEPT]
        counts[part] = {"pairs": len(kept), "identical": int((status == IDENTICAL).sum()),
                        "emptied": int((status == EMPTIED).sum()),
                        "truncated": int(truncated.sum())}
        examples[part] = Examples(columns[id(table)], kept)
        for name in lengths:
            lengths[name].append(np.diff(columns[id(table)][name][1])[kept])
    lengths = {name: _distribution(np.concatenate(values)) for name, values in lengths.items()}
    any_pairs = counts["train"]["pairs"] + counts["held-out"]["pairs"]
    summary = Summary(counts, lengths if any_pairs else {}, cache_files, from_cache)
    return examples["train"], examples["held-out"], summary


def _distribution(lengths):
    if not len(lengths):
        return {"mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    p50, p95 = np.percentile(lengths, [50, 95], method="nearest")
    return {"mean": float(lengths.mean()), "p50": int(p50), "p95": int(p95),
            "max": int(lengths.max())}
