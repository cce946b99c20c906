"""Distillation losses: pure functions of tensors (no .item(), no device moves, no printing)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def soft_teacher_log_probs(teacher_logits: torch.Tensor, temperature: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Log of the weighted mean of the teachers' softened probabilities.

    Args:
        teacher_logits: ``(M, B, K)`` logits of ``M`` teachers, or ``(B, K)`` for one.
        temperature: softening temperature ``T``.
        weights: ``(M,)`` non-negative teacher weights (normalised here); equal when None.

    Returns:
        ``(B, K)`` log-probabilities of ``sum_m w_m softmax(z_m / T)``.

    Example:
        >>> z = torch.randn(2, 4, 10)
        >>> soft_teacher_log_probs(z, 4.0).exp().sum(-1)  # doctest: +ELLIPSIS
        tensor([1.0000, 1.0000, 1.0000, 1.0000])
    """
    if teacher_logits.dim() == 2:
        teacher_logits = teacher_logits.unsqueeze(0)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (M, B, K)
    m = teacher_logits.shape[0]
    if weights is None:
        log_w = torch.full((m,), -math.log(m), device=log_p.device)
    else:
        w = weights.to(log_p)
        log_w = torch.log(w / w.sum())
    # Averaging probabilities (not logits) in log space keeps it exact and stable.
    return torch.logsumexp(log_p + log_w.view(m, 1, 1), dim=0)


def kd_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD term: ``T^2 * KL(p_teacher || softmax(student / T))``, batch mean.

    The ``T^2`` factor keeps the soft-target gradients the same size as the hard-label ones
    when ``T`` changes (Hinton et al. 2015, section 2).
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, teacher_log_probs, reduction="batchmean", log_target=True) * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teachers || student)``.

    With no teacher this is plain cross-entropy (the scratch baseline).
    """
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce
    kd = kd_kl(student_logits, soft_teacher_log_probs(teacher_logits, temperature, weights), temperature)
    return alpha * ce + (1.0 - alpha) * kd


def hint_loss(adapted_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint term: mean squared error between the adapted student feature map ``(B, C, h, w)`` and
    the teacher's ``(B, C, H, W)``, divided by the teacher map's mean square, so 1.0 is what predicting
    zeros costs whatever the teacher's scale. The larger map is average-pooled to the smaller's size.

    Example:
        >>> t = torch.randn(2, 8, 4, 4)
        >>> round(float(hint_loss(torch.zeros(2, 8, 8, 8), t)), 4), float(hint_loss(t, t))
        (1.0, 0.0)
    """
    s, t = adapted_student.float(), teacher_features.float()
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    if s.shape[2:] != (h, w):
        s = F.adaptive_avg_pool2d(s, (h, w))
    if t.shape[2:] != (h, w):
        t = F.adaptive_avg_pool2d(t, (h, w))
    return F.mse_loss(s, t) / (t.pow(2).mean() + 1e-6)  # + 1e-6: a batch of dead (all-zero) teacher units


def warmed_up_alpha(alpha: float, progress: float, warmup: float) -> float:
    """The label loss's weight after ``progress`` epochs when the KD term's weight ``1 - alpha`` ramps up
    linearly over ``warmup`` epochs (it starts at 1: labels only).

    Example:
        >>> warmed_up_alpha(0.5, 0.0, 1.0), warmed_up_alpha(0.5, 0.5, 1.0), warmed_up_alpha(0.5, 3.0, 1.0)
        (1.0, 0.75, 0.5)
    """
    return 1.0 - (1.0 - alpha) * warmup_ramp(progress, warmup)


def warmup_ramp(progress: float, warmup: float) -> float:
    """0 -> 1 linearly over the first ``warmup`` epochs, then 1: how the teacher's terms come in."""
    return 1.0 if warmup <= 0 else min(1.0, progress / warmup)


def with_fresh_views(view_loss: torch.Tensor, n_views: int, fresh_logits: torch.Tensor, fresh_labels: torch.Tensor,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-image mean over a batch of ``n_views`` cached-view images (mean loss ``view_loss``)
    and ``len(fresh_labels)`` fresh augmentations trained on their labels alone.

    A teacher cache holds a few fixed augmented views per image, fewer than a scratch run sees;
    the fresh images give the student the scratch run's augmentation diversity on the labels,
    while the cached views carry the teacher's soft targets.
    """
    if len(fresh_labels) == 0:
        return view_loss
    ce = F.cross_entropy(fresh_logits.float(), fresh_labels, label_smoothing=label_smoothing, reduction="sum")
    return (view_loss * n_views + ce) / (n_views + len(fresh_labels))
