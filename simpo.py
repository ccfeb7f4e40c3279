"""SimPO: Simple Preference Optimization with a Reference-Free Reward (Meng, Xia & Chen, 2024).

This file imports only torch, so you can copy it next to your own trainer and write:

    # a transformers causal LM, peft-wrapped or not: its decoder gives final hidden states
    hidden = model.get_decoder()(input_ids, attention_mask=mask).last_hidden_state   # (2B, T, H)
    # (2B,) average log-probs; the batch is [chosen..., rejected...]
    logps = simpo.chunked_sequence_logps(hidden, model.get_output_embeddings().weight, labels)
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
    """Log-prob of each row's response, from full logits: (B, T, V), (B, T) -> (B,).

    Logits at t predict labels at t+1; labels equal to `ignore_index` (prompt, padding) do not
    count. The sum of token log-probs, divided by the number of response tokens if `average`.
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
    """(..., H) -> (..., V) float32 logits, soft-capped as Gemma-2's if asked for."""
    logits = F.linear(hidden, lm_head_weight, lm_head_bias).float()
    return logits if logit_softcap is None else logit_softcap * torch.tanh(logits / logit_softcap)


def _chunk_token_logps(hidden, weight, bias, targets, softcap):
    # (n, V): the only vocabulary-sized tensor, one chunk at a time
    logits = project_logits(hidden, weight, bias, softcap)
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)


def chunked_sequence_logps(hidden, lm_head_weight, labels, average=True, ignore_index=-100,
                           chunk_size=1024, lm_head_bias=None, logit_softcap=None):
    """`sequence_logps` from final hidden states (B, T, H) and lm_head's (V, H) weight, without
    ever building (B, T, V) logits.

    Only response positions are projected, `chunk_size` tokens at a time under activation
    checkpointing: peak memory is one (chunk_size, V) block instead of the logits and their
    float32 log-softmax (4+ GB for a Llama-3 pair of 2048 tokens), for a second lm_head matmul in
    backward.
    A model that changes logits after lm_head needs it said: Gemma-2's `logit_softcap`, a biased
    head's `lm_head_bias`; a constant logit scale s is `lm_head_weight * s`.
    """
    labels = labels[:, 1:]
    mask = labels != ignore_index
    # (N, H) response positions only and their (N,) targets
    token_logps = chunked_token_logps(hidden[:, :-1][mask], lm_head_weight, labels[mask],
                                      chunk_size, lm_head_bias, logit_softcap)
    # each response token added to its own sequence's sum
    logps = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    logps = logps.index_add(0, mask.nonzero()[:, 0], token_logps)
    return logps / mask.sum(-1).clamp(min=1) if average else logps


def chunked_token_logps(positions, lm_head_weight, targets, chunk_size=1024, lm_head_bias=None,
                        logit_softcap=None):
    """log π(target | position) of N tokens from their (N, H) hidden states: (N,) float32."""
    token_logps = [
        checkpoint(_chunk_token_logps, positions[i:i + chunk_size], lm_head_weight, lm_head_bias,
                   targets[i:i + chunk_size], logit_softcap, use_reentrant=False)
        for i in range(0, targets.numel(), chunk_size)
    ]
    # no token at all: an empty (0,) tensor that is still in the graph
    return torch.cat(token_logps) if token_logps else positions.float().sum(-1)


def simpo_loss(chosen_logps, rejected_logps, beta=2.0, gamma=0.5, loss_type="sigmoid",
               label_smoothing=0.0):
    """The SimPO loss of B preference pairs.

    chosen_logps, rejected_logps: (B,) average log-probs of the chosen (y_w) and rejected (y_l)
        responses. beta: reward scale β (2 to 10 in the paper). gamma: target margin γ; published
        configs give γ/β (`gamma_beta_ratio`), so pass gamma = gamma_beta_ratio * beta.
    loss_type: "sigmoid" (the paper) or "hinge" (relu(1 − z)); label_smoothing ε in [0, 0.5):
        each label taken as flipped with probability ε.
    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·logps, detached.
    """
    # "not >": NaN fails too
    if not (beta > 0 and gamma >= 0 and 0 <= label_smoothing < 0.5):
        raise ValueError(f"need beta > 0, gamma >= 0, label_smoothing in [0, 0.5); got "
                         f"beta={beta}, gamma={gamma}, label_smoothing={label_smoothing}")
    if loss_type not in ("sigmoid", "hinge"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
    if chosen_logps.shape != rejected_logps.shape or chosen_logps.dim() != 1:
        raise ValueError(f"chosen_logps and rejected_logps must both be (B,), got "
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
    """The numbers every preference trainer logs, as floats, from (B,) tensors: one device sync."""
    margins = chosen_rewards - rejected_rewards
    values = torch.stack([chosen_rewards.mean(), rejected_rewards.mean(), margins.mean(),
                          (margins > 0).float().mean(), chosen_logps.mean(), rejected_logps.mean()])
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected"]
    return dict(zip(names, values.detach().float().tolist(), strict=True))
