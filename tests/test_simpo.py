import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import simpo


def ref_sequence_logps(logits, labels, average=True, ignore_index=-100):
    """Independent float64 reference: explicit loops, log-softmax by hand."""
    logits = logits.detach().double()
    out = []
    for b in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == ignore_index:
                continue
            row = logits[b, t]
            total += float(row[target] - row.max() - torch.log(torch.exp(row - row.max()).sum()))
            count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.tensor(out, dtype=torch.float64)


def make_batch(B=3, T=9, V=11, seed=0):
    """Labels with a prompt prefix, right padding, and row 1 with no response tokens at all."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[0, -2:] = -100  # right padding
    labels[1] = -100       # empty response
    return labels, g


# ---------------------------------------------------------------- simpo_loss values

def test_simpo_loss_hand_computed():
    losses, cr, rr = simpo.simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0,
                                      gamma=0.5)
    # z = 2*(-1) - 2*(-2) - 0.5 = 1.5 ; loss = -log sigmoid(1.5) = log(1 + e^-1.5)
    assert_close(losses, torch.tensor([math.log1p(math.exp(-1.5))]))
    assert_close(cr, torch.tensor([-2.0]))
    assert_close(rr, torch.tensor([-4.0]))


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.375), (10.0, 0.0)])
def test_simpo_loss_matches_float64_reference(beta, gamma):
    chosen = torch.tensor([-0.3, -1.7, -2.2, -0.9])
    rejected = torch.tensor([-0.8, -1.1, -2.2, -3.0])
    losses, _, _ = simpo.simpo_loss(chosen, rejected, beta=beta, gamma=gamma)
    expected = [math.log1p(math.exp(-(beta * c - beta * r - gamma)))
                for c, r in zip(chosen.double().tolist(), rejected.double().tolist(), strict=True)]
    assert_close(losses.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_hinge_is_relu_one_minus_z():
    chosen, rejected = torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([-1.5, -1.0, -0.5])
    losses, _, _ = simpo.simpo_loss(chosen, rejected, beta=2.0, gamma=0.5, loss_type="hinge")
    z = 2.0 * chosen - 2.0 * rejected - 0.5  # 1.5, -0.5, -3.5
    assert_close(losses, torch.clamp(1 - z, min=0))
    assert_close(losses, torch.tensor([0.0, 1.5, 4.5]))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_formula(eps):
    chosen, rejected = torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([-1.5, -1.0, -0.5])
    losses, _, _ = simpo.simpo_loss(chosen, rejected, beta=2.0, gamma=0.5, label_smoothing=eps)

    def log_sig(x):
        return -math.log1p(math.exp(-x))

    expected = []
    for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True):
        z = 2.0 * c - 2.0 * r - 0.5
        expected.append(-(1 - eps) * log_sig(z) - eps * log_sig(-z))
    assert_close(losses, torch.tensor(expected))


# ---------------------------------------------------------------- simpo_loss behaviour

def test_gradient_signs():
    chosen = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    rejected = torch.tensor([-2.0, -1.0, -0.5], requires_grad=True)
    losses, _, _ = simpo.simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    losses.sum().backward()
    assert (chosen.grad < 0).all()    # raising chosen log-probs lowers the loss
    assert (rejected.grad > 0).all()  # lowering rejected log-probs lowers the loss


def test_larger_gamma_raises_loss():
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    lo = simpo.simpo_loss(chosen, rejected, beta=2.0, gamma=0.0)[0]
    hi = simpo.simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)[0]
    assert (hi > lo).all()


def test_larger_beta_sharpens_loss():
    gamma = 0.5
    # chosen > rejected + gamma/beta for beta >= 1
    good = (torch.tensor([-1.0]), torch.tensor([-2.0]))
    bad = (torch.tensor([-2.0]), torch.tensor([-1.0]))   # chosen < rejected
    assert (simpo.simpo_loss(*good, beta=4.0, gamma=gamma)[0]
            < simpo.simpo_loss(*good, beta=2.0, gamma=gamma)[0])
    assert (simpo.simpo_loss(*bad, beta=4.0, gamma=gamma)[0]
            > simpo.simpo_loss(*bad, beta=2.0, gamma=gamma)[0])


def test_rewards_are_beta_times_logps_and_detached():
    chosen = torch.tensor([-1.0, -0.25], requires_grad=True)
    rejected = torch.tensor([-3.0, -0.5], requires_grad=True)
    _, cr, rr = simpo.simpo_loss(chosen, rejected, beta=2.5, gamma=0.5)
    assert_close(cr, torch.tensor([-2.5, -0.625]))
    assert_close(rr, torch.tensor([-7.5, -1.25]))
    assert not cr.requires_grad and not rr.requires_grad


@pytest.mark.parametrize("kwargs", [
    dict(beta=0.0), dict(beta=-1.0), dict(gamma=-0.1), dict(label_smoothing=-0.1),
    dict(label_smoothing=0.5), dict(loss_type="ipo"), dict(beta=float("nan")),
    dict(gamma=float("nan")),
])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        simpo.simpo_loss(torch.zeros(2), torch.zeros(2), **kwargs)


@pytest.mark.parametrize("shapes", [((2,), (3,)), ((2,), (2, 1)), ((2, 1), (2, 1))])
def test_shape_mismatch_raises(shapes):
    with pytest.raises(ValueError):  # both must be (B,) with the same B
        simpo.simpo_loss(torch.zeros(shapes[0]), torch.zeros(shapes[1]))


# ---------------------------------------------------------------- sequence_logps

def test_sequence_logps_hand_computed():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: each token log-prob is -log 4
    labels = torch.tensor([[-100, 2, 3]])
    assert_close(simpo.sequence_logps(logits, labels, average=False),
                 torch.tensor([-2 * math.log(4)]))
    assert_close(simpo.sequence_logps(logits, labels, average=True), torch.tensor([-math.log(4)]))


@pytest.mark.parametrize("average", [True, False])
def test_sequence_logps_matches_reference(average):
    labels, g = make_batch()
    logits = 3 * torch.randn(*labels.shape, 11, generator=g)
    out = simpo.sequence_logps(logits, labels, average=average)
    assert_close(out.double(), ref_sequence_logps(logits, labels, average), rtol=1e-5, atol=1e-5)
    assert out[1] == 0  # the row with no response tokens


def test_length_normalisation():
    g = torch.Generator().manual_seed(1)
    resp = torch.tensor([4, 1, 6])
    step_logits = torch.randn(3, 8, generator=g)  # logits at position t predict label t+1
    labels = torch.cat([torch.tensor([-100]), resp]).unsqueeze(0)
    logits = torch.cat([step_logits, torch.randn(1, 8, generator=g)]).unsqueeze(0)
    labels2 = torch.cat([torch.tensor([-100]), resp, resp]).unsqueeze(0)
    logits2 = torch.cat([step_logits, step_logits, torch.randn(1, 8, generator=g)]).unsqueeze(0)
    assert_close(simpo.sequence_logps(logits2, labels2), simpo.sequence_logps(logits, labels))
    assert_close(simpo.sequence_logps(logits2, labels2, average=False),
                 2 * simpo.sequence_logps(logits, labels, average=False))


@pytest.mark.parametrize("average", [True, False])
def test_ignored_positions_change_nothing(average):
    labels, g = make_batch()
    logits = torch.randn(*labels.shape, 11, generator=g)
    base = simpo.sequence_logps(logits, labels, average=average)
    ignored = labels[:, 1:] == -100  # logits at t are ignored when labels[t + 1] is
    logits2 = logits.clone()
    logits2[:, :-1][ignored] = 50 * torch.randn(int(ignored.sum()), 11, generator=g)
    # last position predicts nothing
    logits2[:, -1] = 50 * torch.randn(labels.shape[0], 11, generator=g)
    assert_close(simpo.sequence_logps(logits2, labels, average=average), base)
    # the label id of an ignored position is irrelevant as long as ignore_index marks it
    labels2 = labels.masked_fill(labels == -100, -7)
    assert_close(simpo.sequence_logps(logits, labels2, average=average, ignore_index=-7), base)


def test_right_padding_changes_nothing():
    labels, g = make_batch()
    logits = torch.randn(*labels.shape, 11, generator=g)
    padded_labels = torch.cat([labels, torch.full((3, 5), -100)], dim=1)
    padded_logits = torch.cat([logits, 100 * torch.randn(3, 5, 11, generator=g)], dim=1)
    for average in (True, False):
        assert_close(simpo.sequence_logps(padded_logits, padded_labels, average=average),
                     simpo.sequence_logps(logits, labels, average=average))


def test_all_ignored_row_is_zero_not_nan():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), -100)
    out = simpo.sequence_logps(logits, labels, average=True)
    assert_close(out, torch.zeros(2))
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- chunked_sequence_logps

def _dense_vs_chunked(chunk_size, average, bias=False, softcap=None, T=9):
    labels, g = make_batch(T=T)
    V, H = 11, 6
    hidden = torch.randn(3, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    upstream = torch.randn(3, generator=g)

    def dense():
        logits = hidden @ weight.T + (b if bias else 0)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return simpo.sequence_logps(logits, labels, average=average)

    def chunked():
        return simpo.chunked_sequence_logps(hidden, weight, labels, average=average,
                                            chunk_size=chunk_size, lm_head_bias=b,
                                            logit_softcap=softcap)

    params = [hidden, weight] + ([b] if bias else [])
    results = []
    for fn in (dense, chunked):
        out = fn()
        results.append((out.detach(), torch.autograd.grad((out * upstream).sum(), params)))
    (ref, ref_grads), (got, got_grads) = results
    assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for gg, rg in zip(got_grads, ref_grads, strict=True):
        assert_close(gg, rg, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
@pytest.mark.parametrize("T", [9, 12])
def test_chunked_matches_dense_value_and_grad(chunk_size, average, T):
    _dense_vs_chunked(chunk_size, average, T=T)


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_chunked_with_lm_head_bias(chunk_size):
    _dense_vs_chunked(chunk_size, average=True, bias=True)


@pytest.mark.parametrize("softcap", [2.0, 30.0])
def test_chunked_with_logit_softcap(softcap):
    _dense_vs_chunked(3, average=True, softcap=softcap)


def test_chunked_saves_no_vocab_sized_tensor():
    # H < chunk_size: the saved lm_head weight stays under the bound
    B, T, H, V, chunk_size = 2, 64, 8, 5000, 16
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :10] = -100
    n_response = int((labels[:, 1:] != -100).sum())

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                      lambda t: t):
            fn()
        return max(sizes)

    # sanity: the hook sees the full log-softmax when logits are materialised
    assert largest_saved(lambda: simpo.sequence_logps(hidden @ weight.T, labels)) >= n_response * V
    # a non-checkpointed chunk would save its (chunk_size, V) logits
    assert largest_saved(
        lambda: simpo.chunked_sequence_logps(hidden, weight, labels, chunk_size=chunk_size)
    ) < chunk_size * V


# ---------------------------------------------------------------- metrics and import

def test_preference_metrics_values():
    chosen_logps = torch.tensor([-1.0, -2.0, -1.0, -0.5])
    rejected_logps = torch.tensor([-3.0, -1.0, -1.0, -1.5])
    _, cr, rr = simpo.simpo_loss(chosen_logps, rejected_logps, beta=2.0, gamma=0.5)
    # cr = [-2, -4, -2, -1], rr = [-6, -2, -2, -3]; the tie (pair 3) is not counted as accurate
    metrics = simpo.preference_metrics(chosen_logps, rejected_logps, cr, rr)
    assert metrics == {
        "rewards/chosen": -2.25, "rewards/rejected": -3.25, "rewards/margins": 1.0,
        "rewards/accuracies": 0.5,
        "logps/chosen": -1.125, "logps/rejected": -1.625,
    }
    assert all(type(v) is float for v in metrics.values())


def test_import_does_not_pull_in_transformers():
    code = "import sys, simpo; assert 'transformers' not in sys.modules, 'transformers imported'"
    result = subprocess.run([sys.executable, "-c", code],
                            cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("wrapped", [False, True])
def test_the_module_docstring_example_runs_on_plain_and_peft_models(wrapped):
    """The lines simpo.py offers for copying, run as written: a plain causal LM and a peft one."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1))
    if wrapped:
        model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    input_ids = torch.randint(40, (4, 9))
    mask = torch.ones_like(input_ids)
    labels = input_ids.masked_fill(torch.arange(9) < 4, -100)
    example = simpo.__doc__.split("write:\n\n")[1].split("\n\n")[0]
    scope = {"model": model, "input_ids": input_ids, "mask": mask, "labels": labels,
             "simpo": simpo}
    exec(textwrap.dedent(example), scope)
    reference = simpo.sequence_logps(model(input_ids, attention_mask=mask).logits, labels)
    torch.testing.assert_close(scope["logps"], reference, atol=1e-5, rtol=0)
    assert scope["losses"].shape == (2,)
