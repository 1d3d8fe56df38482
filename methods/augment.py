"""Image augmentations applied per example, vectorised over the batch, drawing from an explicit
generator (so checkpoints restore the stream exactly). No Python loop over examples."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation: zero-pad by `pad`, crop back to the original size at a
    random offset per example, and flip horizontally with probability 1/2. x (B, C, H, W)."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    flip = torch.rand(B, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W), torchvision's ITU-R 601-2 weights."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.reshape(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(eqc, torch.ones_like(maxc), maxc)
    cr_div = torch.where(eqc, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = i.unsqueeze(1) == torch.arange(6, device=i.device).view(1, -1, 1, 1)  # (B, 6, H, W)
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    a4 = torch.stack((a1, a2, a3), 1)  # (B, 3, 6, H, W)
    return torch.einsum("bjhw,bcjhw->bchw", mask.to(x.dtype), a4)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor | None, contrast: torch.Tensor | None,
                 saturation: torch.Tensor | None, hue: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter with a strength per example, in a fixed order (brightness,
    contrast, saturation, hue). x (B, C, H, W) in [0, 1]; strengths (B,) or None (off). Factors
    are drawn per example as ColorJitter draws them: U[max(0, 1 - s), 1 + s], hue U[-s, s].
    Saturation and hue need RGB and leave grayscale images alone, as torchvision does."""
    B = x.shape[0]

    def factor(strength):
        u = torch.rand(B, generator=generator, device=x.device)
        low = (1 - strength).clamp_min(0.0)
        return low + u * (1 + strength - low)

    if brightness is not None:
        x = _blend(x, torch.zeros_like(x), factor(brightness))
    if contrast is not None:
        gray = _grayscale(x) if x.shape[1] == 3 else x
        x = _blend(x, gray.mean((1, 2, 3), keepdim=True), factor(contrast))
    rgb = x.shape[1] == 3
    if saturation is not None and rgb:
        x = _blend(x, _grayscale(x), factor(saturation))
    if hue is not None and rgb:
        shift = (torch.rand(B, generator=generator, device=x.device) * 2 - 1) * hue
        hsv = _rgb_to_hsv(x)
        h = torch.remainder(hsv[:, 0] + shift.reshape(-1, 1, 1), 1.0)
        x = _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))
    return x


def cutout(x: torch.Tensor, length: torch.Tensor, holes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017) with a length and a number of holes per example (integers
    as float tensors (B,)): each hole is a square [c - L//2, c + L//2) around a uniform centre,
    clipped at the border, set to 0 (the mean of standardised inputs)."""
    B, _, H, W = x.shape
    n_max = int(holes.max().item()) if B else 0
    if n_max == 0:
        return x
    cy = torch.randint(0, H, (B, n_max), generator=generator, device=x.device)
    cx = torch.randint(0, W, (B, n_max), generator=generator, device=x.device)
    half = (length.long() // 2).reshape(B, 1)
    active = torch.arange(n_max, device=x.device).reshape(1, -1) < holes.long().reshape(B, 1)  # (B, n)
    ys = torch.arange(H, device=x.device).reshape(1, 1, H)
    xs = torch.arange(W, device=x.device).reshape(1, 1, W)
    in_y = (ys >= (cy - half).unsqueeze(-1)) & (ys < (cy + half).unsqueeze(-1))  # (B, n, H)
    in_x = (xs >= (cx - half).unsqueeze(-1)) & (xs < (cx + half).unsqueeze(-1))  # (B, n, W)
    cut = (in_y.unsqueeze(-1) & in_x.unsqueeze(-2) & active[..., None, None]).any(1)  # (B, H, W)
    return x * (~cut).unsqueeze(1).to(x.dtype)
