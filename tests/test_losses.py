import math

import torch
import torch.nn.functional as F

from edgekd.losses import distillation_loss, kd_kl, soft_teacher_log_probs, with_fresh_views


def test_kd_is_zero_for_equal_logits():
    z = torch.randn(8, 10)
    assert kd_kl(z, soft_teacher_log_probs(z, 4.0), 4.0).abs() < 1e-6


def test_kd_matches_the_formula_written_out():
    torch.manual_seed(0)
    s, t, T = torch.randn(16, 5), torch.randn(16, 5), 3.0
    p_t = F.softmax(t / T, dim=1)
    p_s = F.softmax(s / T, dim=1)
    direct = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * T * T
    assert torch.allclose(kd_kl(s, soft_teacher_log_probs(t, T), T), direct, atol=1e-5)


def test_t_squared_scaling():
    torch.manual_seed(1)
    s, t = torch.randn(32, 10), torch.randn(32, 10)
    for T in (1.0, 2.0, 8.0):
        raw = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
        assert torch.allclose(kd_kl(s, soft_teacher_log_probs(t, T), T), raw * T**2, rtol=1e-5)


def test_multi_teacher_averages_softened_probabilities():
    torch.manual_seed(2)
    z = torch.randn(2, 6, 4)
    T = 2.0
    expected = (F.softmax(z[0] / T, 1) + F.softmax(z[1] / T, 1)) / 2
    assert torch.allclose(soft_teacher_log_probs(z, T).exp(), expected, atol=1e-6)
    w = torch.tensor([3.0, 1.0])
    weighted = 0.75 * F.softmax(z[0] / T, 1) + 0.25 * F.softmax(z[1] / T, 1)
    assert torch.allclose(soft_teacher_log_probs(z, T, w).exp(), weighted, atol=1e-6)
    # one teacher with all the weight is that teacher
    assert torch.allclose(soft_teacher_log_probs(z, T, torch.tensor([1.0, 0.0])).exp(), F.softmax(z[0] / T, 1), atol=1e-6)


def test_distillation_loss_mixes_ce_and_kd():
    torch.manual_seed(3)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = F.cross_entropy(s, y)
    kd = kd_kl(s, soft_teacher_log_probs(t, 4.0), 4.0)
    got = distillation_loss(s, y, t, alpha=0.3, temperature=4.0)
    assert math.isclose(float(got), float(0.3 * ce + 0.7 * kd), rel_tol=1e-5)
    assert torch.allclose(distillation_loss(s, y, None, alpha=0.3, temperature=4.0), ce)


def test_gradient_flows_only_to_student():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    distillation_loss(s, torch.tensor([0, 1, 2, 0]), t.detach(), alpha=0.5, temperature=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_fresh_views_join_the_per_image_mean():
    torch.manual_seed(1)
    z, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    zf, yf = torch.randn(2, 5), y[:2]
    view = distillation_loss(z, y, t, alpha=0.3, temperature=2.0)
    per_image = [distillation_loss(z[i:i + 1], y[i:i + 1], t[i:i + 1], alpha=0.3, temperature=2.0) for i in range(6)]
    per_image += [F.cross_entropy(zf[i:i + 1], yf[i:i + 1]) for i in range(2)]
    assert torch.allclose(with_fresh_views(view, 6, zf, yf), torch.stack(per_image).mean(), atol=1e-6)
    assert with_fresh_views(view, 6, zf[:0], yf[:0]) is view
