"""The M3 training loss: RGB L1 + D-SSIM, and cosine + L2 between decoded and raw features on sampled pixels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2


def _gaussian_window(channels: int, device, dtype) -> Tensor:
    coords = torch.arange(SSIM_WINDOW, device=device, dtype=dtype) - SSIM_WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM of images `a, b: [B, H, W, C]` in [0, 1] (11×11 Gaussian window, σ = 1.5, as 3DGS uses)."""
    a, b = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)
    channels = a.shape[1]
    window = _gaussian_window(channels, a.device, a.dtype)

    def blur(x):
        return F.conv2d(x, window, padding=SSIM_WINDOW // 2, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return (num / den).mean()


def rgb_loss(rendered: Tensor, target: Tensor, ssim_weight: float = 0.2) -> Tensor:
    """(1 − λ)·L1 + λ·(1 − SSIM) on `[B, H, W, 3]` images in [0, 1]."""
    return (1 - ssim_weight) * (rendered - target).abs().mean() + ssim_weight * (1 - ssim(rendered, target))


def feature_loss(decoded: Tensor, raw: Tensor) -> Tensor:
    """Cosine distance + L2 between `decoded, raw: [P, d]` (rows of raw that are all zero carry no feature: skipped)."""
    valid = raw.abs().sum(dim=1) > 0
    if not bool(valid.any()):
        return decoded.sum() * 0.0
    decoded, raw = decoded[valid], raw[valid]
    cosine = 1 - F.cosine_similarity(decoded, raw, dim=1).mean()
    l2 = (decoded - raw).pow(2).sum(dim=1).sqrt().mean()
    return cosine + l2


def psnr(rendered: Tensor, target: Tensor) -> float:
    mse = (rendered - target).pow(2).mean().clamp_min(1e-12)
    return float(-10 * torch.log10(mse))
