"""How a micro-batch of preference pairs is laid out for one forward pass: packed or padded.

packed: each pair is one segment [prompt, chosen, rejected], its prompt computed once. Positions run
    0..P+C-1 then P..P+R-1, and the mask lets rejected tokens see the prompt but never the chosen
    ones: each token sees what it would see in its own padded row. Pairs fill as few rows of
    longest_row(max_length) tokens as hold them; only row ends are padded.
padded: 2B right-padded rows [chosen..., rejected...], each prompt computed twice, for models whose
    layers cannot take the packed mask (modeling.choose_layout decides, on the model itself).
Both carry `response_tokens` (2B,), the scored tokens of each sequence, and `sequence_tokens` (2B,),
its prompt + response tokens (padding never counts).
"""
import math
from typing import NamedTuple

import numpy as np
import torch

# label of positions that are not scored (prompt, padding)
IGNORE_INDEX = -100
# Layers that mix tokens only by attention under the mask; any other kind (Mamba, linear attention,
# convolution) carries a state along the whole row, across the pairs that share it.
ATTENTION_LAYERS = {"attention", "full_attention", "sliding_attention", "chunked_attention"}


class Layout(NamedTuple):
    """What modeling.choose_layout decided: packed or padded rows, for sequences (prompt + the
    longer response) of at most `max_length` tokens, the longest the run scores."""
    packed: bool
    max_length: int


def longest_row(max_length):
    """The most tokens a packed row holds: as many as one pair can span (a one-token prompt and two
    responses of max_length − 1 tokens), so that pairs share rows without a longer one."""
    return 2 * max_length - 1


def build_batch(examples, pad_id, layout):
    """Pairs ({"prompt", "chosen", "rejected"} ids; optional "unscored": how many leading ids of
    chosen and rejected are prompt text, read but not scored) -> model inputs."""
    prompts = [torch.as_tensor(e["prompt"], dtype=torch.long).reshape(-1) for e in examples]
    responses = [[torch.as_tensor(e[side], dtype=torch.long).reshape(-1) for e in examples]
                 for side in ("chosen", "rejected")]
    lengths = torch.tensor([[len(p), len(c), len(r)]
                            for p, c, r in zip(prompts, *responses, strict=True)])
    unscored = torch.tensor([list(e.get("unscored", (0, 0))) for e in examples]).reshape(-1, 2)
    # a response's first token is scored only if something precedes it
    scored = lengths[:, 1:] - torch.maximum(unscored, (lengths[:, :1] == 0).long())
    counts = dict(response_tokens=scored.T.reshape(-1),
                  sequence_tokens=(lengths[:, :1] + lengths[:, 1:]).T.reshape(-1))
    if not layout.packed:
        return padded_rows(examples, pad_id) | counts
    return packed_rows(prompts, responses, lengths, unscored, pad_id, layout.max_length) | counts


def padded_rows(examples, pad_id):
    """2B right-padded rows [chosen..., rejected...] with labels (IGNORE_INDEX where not scored)."""
    sequences, labels = [], []
    for s, side in enumerate(("chosen", "rejected")):
        for e in examples:
            prompt = np.asarray(e["prompt"]).tolist()
            response = np.asarray(e[side]).tolist()
            unscored = e.get("unscored", (0, 0))[s]
            sequences.append(prompt + response)
            labels.append([IGNORE_INDEX] * (len(prompt) + unscored) + response[unscored:])
    width = max(map(len, sequences))

    def pad(rows, value):
        return torch.tensor([row + [value] * (width - len(row)) for row in rows])

    mask = pad([[1] * len(s) for s in sequences], 0)
    return {"input_ids": pad(sequences, pad_id), "attention_mask": mask,
            "labels": pad(labels, IGNORE_INDEX)}


def packed_rows(prompts, responses, lengths, unscored, pad_id, max_length):
    spans = lengths.sum(1).tolist()
    limit = longest_row(max_length)
    order = sorted(range(len(spans)), key=lambda b: -spans[b])
    # the fewest rows that fit, filled longest pair first onto the emptiest row: nearly equal rows
    for n_rows in range(math.ceil(sum(spans) / limit), len(spans) + 1):
        rows = [[] for _ in range(n_rows)]
        filled = [0] * n_rows
        for b in order:
            emptiest = filled.index(min(filled))
            rows[emptiest].append(b)
            filled[emptiest] += spans[b]
        if max(filled) <= limit:
            break
    shape = (len(rows), max(filled))
    input_ids = torch.full(shape, pad_id)
    position_ids = torch.zeros(shape, dtype=torch.long)
    # the pair of each token (-1: padding), and its side: 0 prompt or padding, 1 chosen, 2 rejected
    segment = torch.full(shape, -1)
    side = torch.zeros(shape, dtype=torch.int8)
    score_index, targets, sequence = [], [], []
    for r, row in enumerate(rows):
        start = 0
        for b in row:
            P, C, R = lengths[b].tolist()
            end = start + P + C + R
            input_ids[r, start:end] = torch.cat([prompts[b], responses[0][b], responses[1][b]])
            position_ids[r, start:end] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
            segment[r, start:end] = b
            side[r, start + P:start + P + C] = 1
            side[r, start + P + C:end] = 2
            # A response token is predicted by the hidden state before it, except that the first
            # rejected token follows the prompt, not the chosen response.
            j = torch.arange(R)
            predictors = (start + P - 1 + torch.arange(C),
                          torch.where(j == 0, start + P - 1, start + P + C - 1 + j))
            for s, index in enumerate(predictors):
                # an empty prompt leaves a response's first token without a predictor
                keep = (index >= start) & (torch.arange(len(index)) >= unscored[b, s])
                score_index.append(r * shape[1] + index[keep])
                targets.append(responses[s][b][keep])
                sequence.append(torch.full_like(targets[-1], s * len(spans) + b))
            start = end
    return dict(input_ids=input_ids, position_ids=position_ids, segment=segment, side=side,
                score_index=torch.cat(score_index), targets=torch.cat(targets),
                sequence=torch.cat(sequence))


def attention_inputs(batch, eager_dtype=None):
    """The attention arguments of either layout. Packed: positions and a (rows, 1, T, T) mask: a
    token sees the tokens of its own pair at or before it that are prompt or on its side. Bool for
    SDPA; additive (0 or dtype min) for eager attention, which reads bool masks wrongly."""
    if "segment" not in batch:
        return dict(attention_mask=batch["attention_mask"])
    segment, side = batch["segment"], batch["side"]
    rows, width = segment.shape
    allowed = torch.empty(rows, 1, width, width, dtype=torch.bool, device=segment.device)
    # a row at a time: the temporaries are one (T, T). Padding sees earlier padding: no empty row.
    for r in range(rows):
        torch.eq(segment[r, :, None], segment[r, None, :], out=allowed[r, 0])
        allowed[r, 0] &= (side[r, None, :] == 0) | (side[r, None, :] == side[r, :, None])
        allowed[r, 0].tril_()
    if eager_dtype is not None:
        allowed = torch.zeros(allowed.shape, dtype=eager_dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(eager_dtype).min)
    return dict(position_ids=batch["position_ids"], attention_mask=allowed)


def window(config):
    """The attention window or chunk a decoder config declares, or None."""
    use_window = getattr(config, "use_sliding_window", True)
    sliding = getattr(config, "sliding_window", None) if use_window else None
    return sliding or getattr(config, "attention_chunk_size", None)


def packing_problem(config, max_length):
    """Why a decoder config rules out packing (None if it does not). The 4-D mask must reach every
    layer as given, and nothing may read a token's place in the row instead of its position: no
    layers but attention, no attention soft-capping, no window shorter than `max_length` (the mask
    bypasses it), rows within the model's positions. modeling.choose_layout then checks the
    numbers on rows as long as these."""
    other = sorted(set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYERS)
    if other:
        return (f"{config.model_type} has {'/'.join(other)} layers, whose state runs along the "
                f"whole row")
    attention = getattr(config, "_attn_implementation", None)
    # FlashAttention and FlexAttention take no dense 4-D mask
    if attention not in ("sdpa", "eager"):
        return f"{attention} attention takes no 4-D mask"
    if getattr(config, "attn_logit_softcapping", None):
        return f"{config.model_type} soft-caps its attention logits"
    if window(config) and window(config) < max_length:
        return (f"{config.model_type}'s sliding window ({window(config)}) is shorter than "
                f"{max_length} tokens")
    row = longest_row(max_length)
    positions = getattr(config, "max_position_embeddings", None)
    if positions and row > positions:
        return f"packed rows of up to {row} tokens pass {config.model_type}'s {positions} positions"
    # GPT-Neo's local layers window by place in the row (its `bias` buffer), not by position
    if getattr(config, "window_size", None):
        return f"{config.model_type}'s local attention windows by place in the row"
    # Llama-4's NoPE layers scale queries by place in the row once it reaches floor_scale
    if getattr(config, "attn_temperature_tuning", False) and row >= config.floor_scale:
        return (f"{config.model_type} tunes attention temperature by place in the row past "
                f"{config.floor_scale} tokens")
    return None
