"""SimPO: Simple Preference Optimization with a Reference-Free Reward (Meng, Xia & Chen, 2024).

This file imports only torch, so you can copy it next to your own trainer and write:

    hidden = model.model(input_ids, attention_mask=mask).last_hidden_state    # (2B, T, H)
    # (2B,) average log-probs; the batch is [chosen..., rejected...]
    logps = simpo.chunked_sequence_logps(hidden, model.lm_head.weight, labels)
    chosen_logps, rejected_logps = logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = simpo.simpo_loss(
        chosen_logps, rejected_logps, beta=2.5, gamma=1.4)
    losses.mean().backward()

`labels` are the input ids with every non-response position (prompt, padding) set to -100.

The idea in two lines. SimPO's implicit reward is the policy's *average* log-likelihood:
    r(x, y) = β / |y| · log π(y | x)                                          (paper, eq. 4)
and the loss asks the chosen response to beat the rejected one by a target margin γ:
    L = −log σ( r(x, y_w) − r(x, y_l) − γ )                                    (paper, eq. 6)
No reference model is needed. Dividing by |y| is what stops the policy from learning that longer
answers score higher; `average=False` below turns it off (the paper's ablation).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def sequence_logps(logits, labels, average=True, ignore_index=-100):
    """Log-probability of each row's response tokens, from full logits.

    logits: (B, T, V), labels: (B, T) as the model saw them; logits at t predict labels at t+1.
    Positions whose label is `ignore_index` (prompt, padding) do not count.
    Returns (B,): the sum of token log-probs, divided by the number of response tokens if `average`.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != ignore_index
    # any valid id: these positions are zeroed below
    safe_labels = labels.masked_fill(~mask, 0)
    token_logps = logits.log_softmax(-1).gather(2, safe_labels.unsqueeze(2)).squeeze(2)
    # where, not *: a -inf logit at an ignored position is no NaN
    logps = torch.where(mask, token_logps, 0).sum(-1)
    # clamp: an empty response gives 0
    return logps / mask.sum(-1).clamp(min=1) if average else logps


def project_logits(hidden, lm_head_weight, lm_head_bias=None, logit_softcap=None):
    """(..., H) hidden states -> (..., V) float32 logits, with Gemma-2-style soft-capping if asked
    for. Under bf16 autocast the matmul runs in bf16 and its result is upcast: the log-softmax is
    float32 either way."""
    logits = F.linear(hidden, lm_head_weight, lm_head_bias).float()
    return logits if logit_softcap is None else logit_softcap * torch.tanh(logits / logit_softcap)


def _chunk_token_logps(hidden, weight, bias, targets, softcap):
    # (n, V): the only vocabulary-sized tensor, one chunk at a time
    logits = project_logits(hidden, weight, bias, softcap)
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)


def chunked_sequence_logps(hidden, lm_head_weight, labels, average=True, ignore_index=-100,
                           chunk_size=1024, lm_head_bias=None, logit_softcap=None):
    """`sequence_logps` from the final hidden states, without ever building (B, T, V) logits.

    hidden: (B, T, H) final hidden states (after the last norm); lm_head_weight: (V, H);
    labels: (B, T). Returns (B,) like `sequence_logps`.

    Only response positions are projected onto the vocabulary, `chunk_size` tokens at a time, and
    each chunk runs under activation checkpointing, so backward recomputes its logits instead of
    keeping them: peak memory is one (chunk_size, V) block instead of (B, T, V) logits plus their
    float32 log-softmax (4+ GB for one Llama-3 pair of 2048 tokens). The price is a second lm_head
    matmul per chunk in backward.

    Models that transform logits after lm_head need it said here: Gemma-2 soft-caps them (pass
    `logit_softcap=config.final_logit_softcapping`); a model that multiplies logits by a constant s
    (e.g. Cohere's `logit_scale`) gives the same result with `lm_head_weight * s`; a biased lm_head
    takes `lm_head_bias`.
    """
    labels = labels[:, 1:]
    mask = labels != ignore_index
    # (N, H) response positions only and their (N,) targets, N = number of response tokens
    token_logps = chunked_token_logps(hidden[:, :-1][mask], lm_head_weight, labels[mask],
                                      chunk_size, lm_head_bias, logit_softcap)
    # which sequence each response token belongs to
    rows = mask.nonzero()[:, 0]
    logps = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    logps = logps.index_add(0, rows, token_logps)
    return logps / mask.sum(-1).clamp(min=1) if average else logps


def chunked_token_logps(positions, lm_head_weight, targets, chunk_size=1024, lm_head_bias=None,
                        logit_softcap=None):
    """log π(target | position) of N tokens from their (N, H) final hidden states, `chunk_size` at a
    time under activation checkpointing (see `chunked_sequence_logps`). Returns (N,) float32."""
    token_logps = [
        checkpoint(_chunk_token_logps, positions[i:i + chunk_size], lm_head_weight, lm_head_bias,
                   targets[i:i + chunk_size], logit_softcap, use_reentrant=False)
        for i in range(0, targets.numel(), chunk_size)
    ]
    # No token at all: an empty (0,) tensor that is still in the graph.
    return torch.cat(token_logps) if token_logps else positions.float().sum(-1)


def simpo_loss(chosen_logps, rejected_logps, beta=2.0, gamma=0.5, loss_type="sigmoid",
               label_smoothing=0.0):
    """The SimPO loss for a batch of preference pairs.

    chosen_logps, rejected_logps: (B,) average log-probs of the chosen (y_w) and rejected (y_l)
        responses.
    beta: reward scale β (the paper uses 2 to 10). gamma: target reward margin γ (≥ 0). The official
        repo and its published configs give the margin as `gamma_beta_ratio` = γ/β instead (e.g.
        β=2.5, gamma_beta_ratio=0.55 means γ=1.375): pass gamma = gamma_beta_ratio * beta.
    loss_type: "sigmoid" (the paper) or "hinge" (relu(1 − z)).
    label_smoothing ε ∈ [0, 0.5): assume each label is flipped with probability ε (the
        conservative / noisy-label form).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·logps, detached.
    """
    # "not >": NaN fails too
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type not in ("sigmoid", "hinge"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
    if chosen_logps.shape != rejected_logps.shape or chosen_logps.dim() != 1:
        raise ValueError(f"chosen_logps and rejected_logps must both have shape (B,), got "
                         f"{tuple(chosen_logps.shape)} and {tuple(rejected_logps.shape)}")
    chosen_rewards = beta * chosen_logps                    # r(x, y_w) = β/|y_w| · log π(y_w | x)
    rejected_rewards = beta * rejected_logps                # r(x, y_l) = β/|y_l| · log π(y_l | x)
    z = chosen_rewards - rejected_rewards - gamma           # r(x, y_w) − r(x, y_l) − γ
    if loss_type == "hinge":
        losses = torch.relu(1 - z)
    else:
        # −log σ(z) at ε=0
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def preference_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards):
    """The numbers every preference trainer logs, as plain floats. All inputs (B,)."""
    margins = chosen_rewards - rejected_rewards
    values = torch.stack([chosen_rewards.mean(), rejected_rewards.mean(), margins.mean(),
                          (margins > 0).float().mean(), chosen_logps.mean(), rejected_logps.mean()])
    # the single device sync
    values = values.detach().float().tolist()
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected"]
    return dict(zip(names, values, strict=True))
