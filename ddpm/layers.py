"""The blocks :class:`ddpm.unet.UNet` is built from (Ho et al. 2020, appendix B).

Every block maps ``(B, C, H, W)`` feature maps to feature maps and works in either memory
format (contiguous or ``channels_last``) and under autocast. The last layer of every residual
branch is zero-initialised, so each block starts as the identity (improved-diffusion's
``zero_module``) and the untrained UNet outputs zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool mask of x's shape and memory format, each element True with probability 1 - q,
    q = round(p * 2^16) / 2^16, drawn from torch's default CPU generator.

    The bits come from int64 words (63 random bits each, from ``random_``), cut into three
    16-bit uniform integers: about 2.5x faster on the CPU than the one-Bernoulli-draw-per-element
    mask of ``F.dropout`` (6.5 ms against 16 ms for a (8, 128, 32, 32) map on two cores).
    """
    n = x.numel()
    words = torch.empty((n + 2) // 3, dtype=torch.int64).random_()
    lanes = words.view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[:n]  # little-endian: bits 0-47
    keep = lanes >= round(p * 65536) - 32768  # int16 is uniform on [-32768, 32767]
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        b, c, h, w = x.shape
        return keep.view(b, h, w, c).permute(0, 3, 1, 2)  # same strides as x: a fast multiply
    return keep.view(x.shape)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a faster mask on the CPU (:func:`keep_mask`), which draws the dropping
    probability to the nearest 2^-16 (0.1 -> 0.1000061) and scales the survivors by
    1 / (1 - that), so the output is unbiased. On other devices, and under torch.compile
    (whose graph the mask's in-place draw would break at every residual block, and which
    generates its own dropout kernel): ``nn.Dropout`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
        if not self.training or self.p == 0 or self.p == 1 or not eager_cpu:
            return super().forward(x)
        q = round(self.p * 65536) / 65536
        # One float32 mask, scale folded in: the backward is a single multiply by it. Under
        # bf16 the product is rounded once, with no bias from a bf16-rounded scale.
        return (x * (keep_mask(x, self.p) * (1.0 / (1.0 - q)))).to(x.dtype)


class SinusoidalEmbedding(nn.Module):
    """Transformer positional encoding of the timestep (Vaswani et al. 2017, Ho et al. 2020).

    emb(t) = [sin(s t w_0), ..., sin(s t w_{h-1}), cos(s t w_0), ..., cos(s t w_{h-1})] with
    w_i = 10000^(-i / (h - shift)), h = dim // 2 and s = ``scale``; the DDPM reference code has
    shift 1 (diffusers' ``freq_shift``). ``cos_first`` puts the cosines first (improved-diffusion,
    diffusers' ``flip_sin_to_cos``). An odd ``dim`` gets a trailing zero.
    """

    freqs: torch.Tensor

    def __init__(
        self, dim: int, shift: float = 1.0, cos_first: bool = False, scale: float = 1.0
    ) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"timestep embedding dim must be at least 2; got {dim}")
        self.dim, self.cos_first, self.scale = dim, cos_first, scale
        half = dim // 2
        denominator = half - shift if half - shift > 0 else 1.0
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / denominator)
        # A fixed table, not a parameter: derived from dim, so kept out of the checkpoint.
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) integer or float timesteps -> (B, dim) float32 embedding."""
        t = t.float() if self.scale == 1.0 else t.float() * self.scale
        args = t[:, None] * self.freqs[None]  # (B, dim // 2)
        parts = (args.cos(), args.sin()) if self.cos_first else (args.sin(), args.cos())
        emb = torch.cat(parts, dim=1)  # (B, 2 * (dim // 2))
        return F.pad(emb, (0, self.dim % 2))


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of t (:class:`SinusoidalEmbedding`, same arguments), then
    Linear(dim, 4 dim) - SiLU - Linear(4 dim, 4 dim)."""

    def __init__(
        self, dim: int, shift: float = 1.0, cos_first: bool = False, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.sinusoidal = SinusoidalEmbedding(dim, shift, cos_first, scale)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, 4 * dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, 4 dim)."""
        return self.linear2(F.silu(self.linear1(self.sinusoidal(t))))


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (Ho et al. 2020).

    h = conv(SiLU(GN(x))) + W emb; out = skip(x) + conv(dropout(SiLU(GN(h)))), with skip a
    1x1 conv when the channel count changes and the second conv zero-initialised. With
    ``scale_shift`` (improved-diffusion's use_scale_shift_norm) the embedding gives (scale,
    shift) instead and GN(h) becomes GN(h) (1 + scale) + shift.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float = 0.0,
        num_groups: int = 32,
        eps: float = 1e-6,
        scale_shift: bool = False,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(num_groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch, eps=eps)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, in_ch, H, W), emb (B, emb_dim) already through SiLU -> (B, out_ch, H, W).

        The UNet applies SiLU to the embedding once for all blocks; Ho et al. apply it inside
        each block, to the same tensor, which gives the same result.
        """
        # In-place adds on conv outputs are safe (a conv's backward needs its input, not its
        # output) and save two (B, out_ch, H, W) allocations per block.
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        if self.scale_shift:
            scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h += self.emb_proj(emb)[:, :, None, None]
            h = self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))
        return h.add_(self.skip(x))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels, with a residual connection.

    GroupNorm, q/k/v from one 1x1 conv, softmax attention through
    ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where available),
    zero-initialised 1x1 output projection.
    """

    def __init__(
        self, channels: int, num_heads: int = 1, num_groups: int = 32, eps: float = 1e-6
    ) -> None:
        super().__init__()
        assert channels % num_heads == 0, f"{num_heads} heads do not divide {channels} channels"
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, heads, d, N) -> (B, heads, d, N): softmax(q^T k / sqrt(d)) over keys."""
        out = F.scaled_dot_product_attention(
            q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1)
        )  # (B, heads, N, d)
        return out.transpose(-2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        if h.device.type == "cpu":
            # channels_last makes q, k, v unit-stride along d (views below), as SDPA's fused CPU
            # kernel needs; from contiguous maps the CPU takes the slower unfused maths path
            # (measured). Elsewhere the copy is not made: CUDA trains and samples in
            # channels_last, where it is a no-op, and no measurement says it helps otherwise.
            h = h.contiguous(memory_format=torch.channels_last)
        qkv = self.qkv(h).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        out = self.attend(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (B, heads, d, N)
        return x + self.proj(out.reshape(B, C, H, W))


class LinearAttention(Attention):
    """Linear attention (Katharopoulos et al. 2020, eq. 4-6): O(N) in the number of pixels.

    With the feature map phi(x) = elu(x) + 1 > 0 replacing exp(q . k), the sums over keys factor:
    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j)). Same parameters and
    interface as :class:`Attention`; only the attention itself differs.
    """

    eps: float = 1e-6

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, heads, d, N) -> (B, heads, d, N)."""
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = k @ v.transpose(-2, -1)  # (B, heads, d, d): sum_j phi(k_j) v_j^T
        num = kv.transpose(-2, -1) @ q  # (B, heads, d, N)
        den = k.sum(dim=-1, keepdim=True).transpose(-2, -1) @ q  # (B, heads, 1, N)
        return num / (den + self.eps)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv.

    ``asymmetric`` pads one row and column at the bottom and right only, as the DDPM paper's
    TF code ("SAME" padding for stride 2) does; ``symmetric`` pads one on every side. The two
    see the image shifted by a pixel: the same parameters, not the same function.
    """

    def __init__(self, channels: int, padding: str = "asymmetric") -> None:
        super().__init__()
        self.asymmetric = padding == "asymmetric"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H / 2, W / 2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


def nearest_x2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2 H, 2 W), each pixel repeated 2x2: ``F.interpolate``'s nearest
    x2, except when deterministic algorithms are asked for, where the same values come from an
    expand, whose backward is a plain sum (CUDA's upsample backward may not be deterministic)."""
    if not torch.are_deterministic_algorithms_enabled():
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2 H, 2 W)."""
        return self.conv(nearest_x2(x))
