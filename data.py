"""Preference data for train.py and eval.py: load, check, apply the chat template, tokenize, batch.

Two layouts are read, detected row by row:
  standard        {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"chosen": [messages], "rejected": [messages], "prompt": str | [messages] | absent}
                  where a message is {"role": ..., "content": ...}. The response is the last (assistant)
                  message; turns before it, shared by chosen and rejected, are the prompt. This covers
                  HuggingFaceH4/ultrafeedback_binarized and princeton-nlp/llama3-ultrafeedback-armorm.
Every problem is a DataError whose message names the file, row and field.
"""
import json
import random
from pathlib import Path
from typing import NamedTuple

import torch
from jinja2 import TemplateError
from tqdm import tqdm

IGNORE_INDEX = -100  # label of positions that are not scored (prompt, padding)
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Bad input: one line, naming the file, row and field."""


class Pair(NamedTuple):
    prompt: list          # messages
    chosen: dict          # the preferred response, one assistant message
    rejected: dict
    conversational: bool  # read from message lists (needs a chat template)
    where: str            # "file: row N", for error messages


def load_rows(dataset, split):
    """Rows of a local file or folder, or of a hub dataset, as a `datasets.Dataset`."""
    from datasets import load_dataset  # slow to import; only needed here

    path = Path(dataset)
    suffix = path.suffix.lower()
    looks_local = suffix in FILE_TYPES or dataset.startswith((".", "/", "~")) or dataset.count("/") > 1 or \
        (path.parent != Path(".") and path.parent.is_dir())  # hub ids are "name" or "org/name"
    if looks_local and not path.exists():
        raise DataError(f"{dataset}: no such file or folder")
    if path.is_file() and suffix not in FILE_TYPES:
        raise DataError(f"{dataset}: unsupported file type {path.suffix!r} (use {', '.join(FILE_TYPES)})")
    try:
        if path.is_file():  # a single file serves as whatever split is asked for
            return load_dataset(FILE_TYPES[suffix], data_files={split: str(path)}, split=split)
        return load_dataset(dataset, split=split)
    except Exception as error:
        if suffix in (".json", ".jsonl"):  # find the exact row that arrow choked on
            rows = _json_rows(path)
            for index, row in enumerate(rows):
                to_pair(row, f"{dataset}: row {index + 1}")
            if not rows:
                raise DataError(f"{dataset}: no rows") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
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
        problem = "missing" if value is None else "empty" if isinstance(value, str) else \
            f"not a string ({type(value).__name__})"
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
                raise DataError(f"{where}: field '{field}': last message must be the assistant's response")
        if chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their last message")
        prompt = chosen[:-1]
        if not prompt:  # the prompt is not inside the conversations: it has its own column
            value = row.get("prompt")
            prompt = _messages(value, where, "prompt") if isinstance(value, list) else \
                [{"role": "user", "content": _text(value, where, "prompt")}]
        return Pair(prompt, chosen[-1], rejected[-1], True, where)
    prompt = _text(row.get("prompt"), where, "prompt")
    chosen, rejected = (_text(row.get(field), where, field) for field in ("chosen", "rejected"))
    return Pair([{"role": "user", "content": prompt}], {"role": "assistant", "content": chosen},
                {"role": "assistant", "content": rejected}, False, where)


def read_pairs(dataset, split):
    rows = load_rows(dataset, split)
    if "chosen" not in rows.column_names or "rejected" not in rows.column_names:
        raise DataError(f"{dataset}: unknown column layout {rows.column_names}: expected 'prompt', 'chosen', "
                        f"'rejected' strings, or 'chosen'/'rejected' message lists")
    if len(rows) == 0:
        raise DataError(f"{dataset}: split {split!r} has no rows")
    return [to_pair(row, f"{dataset}: row {i + 1}") for i, row in enumerate(rows)]


def _prompt_and_response_text(tokenizer, prompt, response):
    if tokenizer.chat_template is None:  # plain text: only for the standard layout (checked by the caller)
        return prompt[-1]["content"], response["content"]
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + [response], tokenize=False)
    if not full_text.startswith(prompt_text):  # templates that rewrite earlier turns: fall back to the raw response
        return prompt_text, response["content"]
    return prompt_text, full_text[len(prompt_text):]


def _shared_length(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer, prompt, chosen, rejected, max_length, max_prompt_length):
    """Token ids of one pair, truncated; None if a response would end up empty."""
    prompt_text, chosen_text = _prompt_and_response_text(tokenizer, prompt, chosen)
    rejected_text = _prompt_and_response_text(tokenizer, prompt, rejected)[1]
    encode = lambda text, special=False: tokenizer(text, add_special_tokens=special)["input_ids"]  # noqa: E731
    if tokenizer.chat_template is None:  # plain text: prompt (with the tokenizer's BOS) and response apart, as TRL
        prompt_ids = encode(prompt_text, special=True)
        fulls = [prompt_ids + encode(text) for text in (chosen_text, rejected_text)]
    else:  # the template writes BOS itself: adding another is the double BOS the official repo warns of (Llama-3)
        # Each conversation is tokenized in one piece, as the model reads it. Where a token spans the boundary
        # (SentencePiece's "▁Hello", "\n" + text), it belongs to the response and the prompt ends before it.
        prompt_ids, fulls = encode(prompt_text), [encode(prompt_text + text) for text in (chosen_text, rejected_text)]
    cut = min(_shared_length(prompt_ids, full) for full in fulls)
    prompt_ids, responses = prompt_ids[:cut], [full[cut:] for full in fulls]
    # End on EOS so the policy learns to stop; cut after the last EOS what a template writes after it (e.g. "\n").
    eos = tokenizer.eos_token_id
    responses = [ids[:len(ids) - ids[::-1].index(eos)] if eos in ids else ids + [eos] for ids in responses]
    if len(prompt_ids) + max(map(len, responses)) > max_length:
        if len(prompt_ids) > max_prompt_length:  # first the prompt loses its start (its end holds the question)
            bos = prompt_ids[:1] if prompt_ids[0] == tokenizer.bos_token_id else []  # BOS stays
            prompt_ids = bos + prompt_ids[len(prompt_ids) - max_prompt_length + len(bos):]
        responses = [ids[:max(0, max_length - len(prompt_ids))] for ids in responses]  # then the responses their end
    if not all(responses):
        return None
    return {"prompt": prompt_ids, "chosen": responses[0], "rejected": responses[1]}


def tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length, source):
    """Tokenize every pair once, up front. Returns (examples, number skipped for an empty response)."""
    if tokenizer.chat_template is None and any(pair.conversational for pair in pairs):
        raise DataError(f"{source}: conversational data needs a chat template, and this tokenizer has none "
                        f"(pass --chat-template)")
    examples = []
    for pair in tqdm(pairs, desc=f"tokenizing {source}", leave=False):
        try:
            examples.append(tokenize_pair(tokenizer, pair.prompt, pair.chosen, pair.rejected, max_length, max_prompt_length))
        except TemplateError as error:  # e.g. Gemma-2's template refuses a system turn
            raise DataError(f"{pair.where}: the chat template fails on this row: {error}") from None
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


def load_examples(tokenizer, dataset, split, eval_split=None, eval_fraction=0.0, seed=0, max_length=2048,
                  max_prompt_length=1800):
    """Tokenized (train, held-out) examples and the count of skipped pairs, shared by train.py and eval.py."""
    if eval_split and Path(dataset).is_file():
        raise DataError(f"{dataset}: a single file has no separate {eval_split!r} split: use --eval-fraction, or a "
                        f"folder with train and test files")
    train = read_pairs(dataset, split)
    held_out = read_pairs(dataset, eval_split) if eval_split else []
    if not eval_split and eval_fraction > 0:  # a fixed, seeded slice of the training split
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        cut = max(1, int(len(train) * eval_fraction))
        held_out, train = [train[i] for i in order[:cut]], [train[i] for i in order[cut:]]
    train, skipped = tokenize_pairs(train, tokenizer, max_length, max_prompt_length, f"{dataset}:{split}")
    held_out, skipped_eval = tokenize_pairs(held_out, tokenizer, max_length, max_prompt_length, f"{dataset}:held-out")
    return train, held_out, skipped + skipped_eval


def collate(examples, pad_id):
    """Pairs -> one right-padded batch of 2·B sequences, ordered [chosen..., rejected...]."""
    sequences = [e["prompt"] + e[side] for side in ("chosen", "rejected") for e in examples]
    labels = [[IGNORE_INDEX] * len(e["prompt"]) + e[side] for side in ("chosen", "rejected") for e in examples]
    width = max(map(len, sequences))
    pad = lambda rows, value: torch.tensor([row + [value] * (width - len(row)) for row in rows])
    return {"input_ids": pad(sequences, pad_id), "attention_mask": pad([[1] * len(s) for s in sequences], 0),
            "labels": pad(labels, IGNORE_INDEX)}
