"""The training objectives against hand computations: next-token CE, the MTP loss (which token each depth
predicts), and the sequence-wise balance loss of the report."""

import math

import torch

from dsv3.train.losses import (gate_seq_lens, model_balance_loss, moe_gates, mtp_loss, next_token_loss,
                               sequence_balance_loss)
from test_train_shared import tiny_model


def _ce_by_hand(logits_row: torch.Tensor, target: int) -> float:
    """-log softmax(logits)[target], written out with exp/sum in float64."""
    row = logits_row.double()
    return float(math.log(row.exp().sum()) - row[target])


def test_mtp_loss_predicts_token_t_plus_k_plus_1():
    model = tiny_model(num_nextn_predict_layers=2)
    seq = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))  # [B, T + 1]
    inputs, targets = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        logits, mtp_logits = model(inputs, return_mtp=True, absorb=False)
    B, T = inputs.shape
    assert [tuple(m.shape) for m in mtp_logits] == [(B, T - 1, 64), (B, T - 2, 64)]
    weight, depths = 0.3, len(mtp_logits)
    per_depth = []
    for k, lk in enumerate(mtp_logits, start=1):
        ces = [_ce_by_hand(lk[b, t], int(seq[b, t + k + 1])) for b in range(B) for t in range(T - k)]
        per_depth.append(sum(ces) / len(ces))
    expected = weight / depths * sum(per_depth)
    assert abs(float(mtp_loss(mtp_logits, targets, weight)) - expected) < 1e-5
    main = [_ce_by_hand(logits[b, t], int(seq[b, t + 1])) for b in range(B) for t in range(T)]
    assert abs(float(next_token_loss(logits, targets)) - sum(main) / len(main)) < 1e-5
    assert float(mtp_loss([], targets, weight)) == 0.0


def _balance_by_hand(scores, indices, seq_len, topk, alpha):
    n_experts = scores.shape[1]
    losses = []
    for start in range(0, scores.shape[0], seq_len):
        s, idx = scores[start:start + seq_len].tolist(), indices[start:start + seq_len].tolist()
        total = 0.0
        for i in range(n_experts):
            f_i = n_experts / (topk * seq_len) * sum(i in row for row in idx)
            p_i = sum(row[i] / sum(row) for row in s) / seq_len
            total += f_i * p_i
        losses.append(alpha * total)
    return sum(losses) / len(losses)


def test_sequence_balance_loss_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    seq_len, n_seq, n_experts, topk, alpha = 7, 3, 8, 2, 1e-2
    scores = torch.rand(seq_len * n_seq, n_experts, generator=g).requires_grad_()
    indices = torch.rand(seq_len * n_seq, n_experts, generator=g).topk(topk, dim=-1).indices  # not the top scores
    loss = sequence_balance_loss(scores, indices, seq_len, topk, alpha)
    assert abs(loss.item() - _balance_by_hand(scores.detach(), indices, seq_len, topk, alpha)) < 1e-7
    loss.backward()  # gradient flows through P (the scores), not through the counts
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    # uniform scores: P_i = 1/E and sum_i f_i = E, so the loss is exactly alpha whatever the routing
    uniform = torch.full((seq_len, n_experts), 0.3)
    assert abs(float(sequence_balance_loss(uniform, indices[:seq_len], seq_len, topk, alpha)) - alpha) < 1e-9


def test_balance_loss_sums_every_moe_layer_with_its_sequence_length():
    model = tiny_model(n_layers=3, n_dense_layers=1, num_nextn_predict_layers=1)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    model(tokens, return_mtp=True, absorb=False)
    gates = moe_gates(model)
    assert gate_seq_lens(model, 9) == [9, 9, 8]  # two MoE main layers, MTP depth 1 sees T - 1 positions
    expected = sum(_balance_by_hand(g.last_scores.detach(), g.last_indices, n, g.topk, 0.5)
                   for g, n in zip(gates, [9, 9, 8]))
    got = model_balance_loss(model, 9, 0.5)
    assert abs(got.item() - expected) < 1e-6
    got.backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in gates)


def test_compiled_losses_equal_eager_values_and_gradients():
    """The trainer compiles the CE and the balance loss with `--compile`: same values and gradients."""
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 33, dtype=torch.bfloat16)
    targets = torch.randint(0, 33, (2, 7))
    targets[0, 3] = -100
    scores = torch.rand(14, 8)
    indices = scores.topk(2, dim=-1)[1]
    outs = []
    for ce, bal in ((next_token_loss, sequence_balance_loss),
                    (torch.compile(next_token_loss, dynamic=False), torch.compile(sequence_balance_loss, dynamic=False))):
        lg, sc = logits.clone().requires_grad_(), scores.clone().requires_grad_()
        loss = ce(lg, targets) + bal(sc, indices, 7, 2, 0.01)
        loss.backward()
        outs.append((loss, lg.grad.float(), sc.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
