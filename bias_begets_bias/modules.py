"""The conditional UNet and its conditioning vector. No I/O, no downloads, no devices.

Architecture (docs/original.md section 2, from the public CIFAR conditional-DDPM tutorial):
inc DoubleConv -> 3 x (Down + SelfAttention) -> 3 DoubleConv bottleneck -> 3 x (Up +
SelfAttention) -> 1x1 conv. With ``UNetConfig.paper()`` it has exactly the original's
23,332,739 parameters. Widths, attention placement and GroupNorm groups are configurable
for smaller presets.

Conditioning: every Down/Up block (and with ``bottleneck_cond`` each bottleneck conv) receives
``emb = [sinusoidal(t) (128) ; JL(word) (128)]``, with zeros in the word half for the
unconditional branch (classifier-free guidance). The ``paper`` setting feeds that vector to
the blocks as the original did; ``cond_mlp=True`` passes it through a learned 2-layer MLP
first (the learned class-embedding route of EDM, Karras et al. 2022) so the word half is not
drowned by the larger-norm time half.

Attention uses ``torch.nn.functional.scaled_dot_product_attention``: the original's
``nn.MultiheadAttention`` materialises the full (H*W)^2 attention matrix, 13.4 GB per copy
at 64x64 and batch 50. The parameters are laid out as in ``nn.MultiheadAttention``
(in-projection 3C x C + bias, out-projection C x C + bias), so the count is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    """Everything that fixes the network's shape; saved in each run's config.json."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    widths: tuple[int, int, int, int] = (64, 128, 256, 256)  # inc, down1, down2, down3
    bottleneck: int = 512
    attention: tuple[bool, ...] = (True,) * 6  # sa1..sa6 (down at S/2, S/4, S/8; up at S/4, S/2, S)
    norm_groups: int = 1  # GroupNorm groups (the original: 1, i.e. LayerNorm over C, H, W)
    heads: int = 4
    time_dim: int = 128  # sinusoidal half of the conditioning vector
    word_dim: int = 128  # JL half of the conditioning vector
    word_scale: float = 1.0  # multiplies the word half (unit JL vectors have norm ~1, the time half ~8)
    cond_mlp: bool = False  # learned MLP on the conditioning vector (EDM-style); False = the original
    scale_shift: bool = False  # blocks apply the vector as h * (1 + scale) + shift (ADM's AdaGN); False = + shift only
    bottleneck_cond: bool = False  # the bottleneck's three convs also receive the vector; False = the original (none)
    emb_dim: int = 256  # width of the vector the blocks see (= time_dim + word_dim without the MLP)

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        self.attention = tuple(bool(a) for a in self.attention)
        if len(self.widths) != 4 or len(self.attention) != 6:
            raise ValueError("widths needs 4 entries and attention 6")
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (three 2x downsamplings), got {self.image_size}")
        if not self.cond_mlp and self.emb_dim != self.time_dim + self.word_dim:
            raise ValueError("without cond_mlp, emb_dim must equal time_dim + word_dim")

    @classmethod
    def paper(cls) -> "UNetConfig":
        return cls()

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(t * f_i) ; cos(t * f_i)] with f_i = 1 / 10000^(2i / dim), i < dim/2 (Vaswani et al. 2017).

    Sin half first, then cos half, as the original tutorial's ``pos_encoding``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=t.device, dtype=torch.float32) / dim)
    angles = t.float()[:, None] * freqs[None, :half]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class DoubleConv(nn.Module):
    """conv3x3 -> GroupNorm -> GELU -> conv3x3 -> GroupNorm, optionally residual: GELU(x + f(x))."""

    def __init__(self, cin: int, cout: int, mid: int | None = None, residual: bool = False, groups: int = 1):
        super().__init__()
        mid = mid or cout
        self.residual = residual
        self.net = nn.Sequential(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(groups, mid), mid), nn.GELU(),
            nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(groups, cout), cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.net(x)) if self.residual else self.net(x)


class Conditioned(nn.Module):
    """Applies the conditioning vector to a block's output: h + shift (the original), or
    h * (1 + scale) + shift with ``scale_shift`` (FiLM / ADM's AdaGN, Dhariwal & Nichol 2021),
    which lets the word gate features instead of only offsetting them."""

    def __init__(self, channels: int, emb_dim: int, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, channels * (2 if scale_shift else 1)))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        e = self.emb(emb)[:, :, None, None]
        if not self.scale_shift:
            return h + e
        scale, shift = e.chunk(2, dim=1)
        return h * (1 + scale) + shift


class Down(Conditioned):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, scale_shift: bool = False):
        super().__init__(cout, emb_dim, scale_shift)
        self.conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cin, residual=True, groups=groups),
                                  DoubleConv(cin, cout, groups=groups))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return super().forward(self.conv(x), emb)


class Up(Conditioned):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, scale_shift: bool = False):
        super().__init__(cout, emb_dim, scale_shift)
        self.conv = nn.Sequential(DoubleConv(cin, cin, residual=True, groups=groups),
                                  DoubleConv(cin, cout, cin // 2, groups=groups))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return super().forward(self.conv(torch.cat([skip, x], dim=1)), emb)


class SelfAttention(nn.Module):
    """Pre-LN multi-head self-attention over the H*W tokens plus a pre-LN feed-forward, both residual."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.ff = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels), nn.GELU(),
                                nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B, HW, C
        q, k, v = self.qkv(self.norm(tokens)).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        tokens = tokens + self.proj(attended)
        tokens = tokens + self.ff(tokens)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class ConditionalUNet(nn.Module):
    """eps/v/x0 predictor f(x_t, t, word_vector); ``word_vectors=None`` or zeros = unconditional."""

    def __init__(self, config: UNetConfig, word_table: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.widths
        g, e, ss = config.norm_groups, config.emb_dim, config.scale_shift
        # Training words' projected vectors, moved with the model and saved with it.
        table = word_table if word_table is not None else torch.zeros(0, config.word_dim)
        self.register_buffer("word_table", table.float().clone(), persistent=True)
        cond_in = config.time_dim + config.word_dim
        self.cond = nn.Sequential(nn.Linear(cond_in, e), nn.SiLU(), nn.Linear(e, e)) if config.cond_mlp else None

        def attention(flag: bool, ch: int) -> nn.Module:
            return SelfAttention(ch, config.heads) if flag else nn.Identity()

        a = config.attention
        self.inc = DoubleConv(config.in_channels, c0, groups=g)
        self.down1, self.sa1 = Down(c0, c1, e, g, ss), attention(a[0], c1)
        self.down2, self.sa2 = Down(c1, c2, e, g, ss), attention(a[1], c2)
        self.down3, self.sa3 = Down(c2, c3, e, g, ss), attention(a[2], c3)
        self.bot = nn.Sequential(DoubleConv(c3, config.bottleneck, groups=g),
                                 DoubleConv(config.bottleneck, config.bottleneck, groups=g),
                                 DoubleConv(config.bottleneck, c3, groups=g))
        # The lowest resolution is where a sample's global attributes (hair, scene) are decided; the
        # original conditions only the Down/Up outputs around it.
        self.bot_cond = nn.ModuleList(Conditioned(ch, e, ss) for ch in (config.bottleneck, config.bottleneck, c3)) \
            if config.bottleneck_cond else None
        self.up1, self.sa4 = Up(c3 + c2, c1, e, g, ss), attention(a[3], c1)
        self.up2, self.sa5 = Up(c1 + c1, c0, e, g, ss), attention(a[4], c0)
        self.up3, self.sa6 = Up(c0 + c0, c0, e, g, ss), attention(a[5], c0)
        self.outc = nn.Conv2d(c0, config.out_channels, 1)

    def conditioning(self, t: torch.Tensor, word_vectors: torch.Tensor | None) -> torch.Tensor:
        """[sinusoidal(t) ; word_scale * word] (zeros for unconditional rows), optionally through the MLP."""
        time_half = sinusoidal_embedding(t, self.config.time_dim)
        if word_vectors is None:
            word_half = time_half.new_zeros(len(t), self.config.word_dim)
        else:
            word_half = word_vectors.to(time_half.dtype) * self.config.word_scale
        emb = torch.cat([time_half, word_half], dim=-1)
        return self.cond(emb) if self.cond is not None else emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, word_vectors: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.conditioning(t, word_vectors)
        x1 = self.inc(x)
        x2 = self.sa1(self.down1(x1, emb))
        x3 = self.sa2(self.down2(x2, emb))
        x4 = self.sa3(self.down3(x3, emb))
        if self.bot_cond is None:
            x4 = self.bot(x4)
        else:
            for conv, condition in zip(self.bot, self.bot_cond):
                x4 = condition(conv(x4), emb)
        x = self.sa4(self.up1(x4, x3, emb))
        x = self.sa5(self.up2(x, x2, emb))
        x = self.sa6(self.up3(x, x1, emb))
        return self.outc(x)


class EMA:
    """Exponential moving average of weights; for the first ``warmup_steps`` it copies the model.

    ema <- beta * ema + (1 - beta) * model after the warm-up (docs/original.md section 2).
    """

    def __init__(self, beta: float, warmup_steps: int):
        self.beta = beta
        self.warmup_steps = warmup_steps

    @torch.no_grad()
    def update(self, ema_model: nn.Module, model: nn.Module, step: int) -> None:
        ema_params = list(ema_model.parameters())
        params = list(model.parameters())
        if step < self.warmup_steps:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.beta)
