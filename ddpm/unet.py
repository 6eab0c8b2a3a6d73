"""The denoising network: the DDPM UNet (Ho et al. 2020, appendix B; improved-diffusion).

A conv to ``base_channels``, then per resolution level ``num_res_blocks`` residual blocks
(with self-attention at ``attention_resolutions``) and a downsampling between levels; a middle
ResBlock-Attention-ResBlock; an up path mirroring it with ``num_res_blocks + 1`` blocks per
level, each fed the matching down-path activation through a skip concatenation; and
GroupNorm-SiLU-conv out. The default :class:`~ddpm.config.UNetConfig` is the paper's CIFAR-10
network, 35,746,307 parameters.

Class conditioning adds a learned label embedding to the timestep embedding; label
``num_classes`` is the "null" class that classifier-free guidance (Ho & Salimans 2022) trains
by label dropout and samples as the unconditional model (a model without one, such as
improved-diffusion's class-conditional ImageNet models, has ``null_class`` false).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.config import UNetConfig
from ddpm.layers import (
    Attention,
    Downsample,
    LinearAttention,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    zero_init,
)


class ResAttnBlock(nn.Module):
    """A ResBlock, followed by self-attention at the resolutions that have it."""

    def __init__(self, res: ResBlock, attn: Attention | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, in_ch, H, W), emb (B, E) -> (B, out_ch, H, W)."""
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """eps / x0 / v-prediction network f(x_t, t, y) of the shape of x_t.

    Attributes:
        config: the :class:`UNetConfig` the network was built from (checkpoints store it).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch, emb_dim, groups = config.base_channels, 4 * config.base_channels, config.num_groups
        eps = config.norm_eps
        attn_cls = LinearAttention if config.attention_type == "linear" else Attention

        def res(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(
                in_ch, out_ch, emb_dim, config.dropout, groups, eps, config.scale_shift_norm
            )

        def block(in_ch: int, out_ch: int, resolution: int) -> ResAttnBlock:
            with_attn = resolution in config.attention_resolutions
            attn = attn_cls(out_ch, config.num_heads, groups, eps) if with_attn else None
            return ResAttnBlock(res(in_ch, out_ch), attn)

        self.time_embed = TimestepEmbedding(
            ch, config.time_freq_shift, config.flip_sin_to_cos, config.time_scale
        )
        # With a null class, one row more than there are classes (classifier-free guidance).
        n_cls = config.num_classes
        rows = None if n_cls is None else n_cls + int(config.null_class)
        self.class_embed = nn.Embedding(rows, emb_dim) if rows is not None else None
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        # Down path; skip_chs records the channels of every activation the up path will reuse.
        widths = [ch * m for m in config.channel_mults]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skip_chs, in_ch = [ch], ch
        for level, (out_ch, resolution) in enumerate(zip(widths, config.resolutions, strict=True)):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(block(in_ch, out_ch, resolution))
                in_ch = out_ch
                skip_chs.append(in_ch)
            self.down.append(blocks)
            if level < len(widths) - 1:
                self.downsample.append(Downsample(in_ch, config.downsample_padding))
                skip_chs.append(in_ch)

        self.mid_block1 = res(in_ch, in_ch)
        self.mid_attn = attn_cls(in_ch, config.num_heads, groups, eps)
        self.mid_block2 = res(in_ch, in_ch)

        # Up path, from the lowest resolution: every block concatenates one skip.
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            out_ch, resolution = widths[level], config.resolutions[level]
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(block(in_ch + skip_chs.pop(), out_ch, resolution))
                in_ch = out_ch
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(Upsample(in_ch))
        assert not skip_chs, "every down-path activation must be consumed by the up path"

        self.norm_out = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv_out = zero_init(nn.Conv2d(in_ch, config.out_channels, 3, padding=1))

    @property
    def null_class(self) -> int | None:
        """The label of the null (unconditional) class; None for an unconditional model and
        for a conditional one without a null class (``UNetConfig.null_class`` false)."""
        return self.config.num_classes if self.config.null_class else None

    def num_parameters(self) -> int:
        """Number of parameters (all are trainable)."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """(B,) timesteps and (B,) labels or None -> (B, 4 base_channels), after SiLU."""
        emb = self.time_embed(t)  # (B, E)
        if self.class_embed is not None:
            if y is None:
                if self.null_class is None:
                    raise ValueError(
                        "this class-conditional UNet has no null class (null_class=False, as "
                        "improved-diffusion's models): pass labels y; it has no unconditional mode"
                    )
                y = torch.full_like(t, self.null_class, dtype=torch.long)
            emb = emb + self.class_embed(y)
        elif y is not None:
            raise ValueError(
                "labels y were given to an unconditional UNet (num_classes=None); pass y=None, "
                "or build the model with UNetConfig(num_classes=...)"
            )
        return F.silu(emb)

    def _check_shapes(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> None:
        channels, factor = self.config.in_channels, 2 ** (len(self.config.channel_mults) - 1)
        assert x.ndim == 4 and x.shape[1] == channels, (
            f"x must be (B, {channels}, H, W) for in_channels={channels}; got {tuple(x.shape)}"
        )
        assert x.shape[2] % factor == 0 and x.shape[3] % factor == 0, (
            f"H and W must be divisible by {factor}; got x of shape {tuple(x.shape)}"
        )
        batch = (x.shape[0],)
        assert t.shape == batch, f"t must have shape {batch}; got {tuple(t.shape)}"
        assert y is None or y.shape == batch, f"y must have shape {batch}; got {tuple(y.shape)}"

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The network's prediction for noisy images x at timesteps t.

        Args:
            x: (B, C, H, W) float images, H and W divisible by 2^(levels - 1).
            t: (B,) integer or float timesteps.
            y: (B,) long class labels in [0, num_classes]; num_classes is the null class, and
                None means the null class. Must be None for an unconditional model.

        Returns:
            (B, C, H, W), in the dtype autocast gives the last conv.
        """
        self._check_shapes(x, t, y)
        emb = self.embed(t, y)  # (B, E)

        h = self.conv_in(x)  # (B, ch, H, W)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                h = blk(h, emb)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)  # (B, ch_level, H / 2^(level+1), ...)
                skips.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)

        for level, blocks in enumerate(self.up):
            for blk in blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
            if level < len(self.upsample):
                h = self.upsample[level](h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)
