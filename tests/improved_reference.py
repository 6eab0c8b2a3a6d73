"""improved-diffusion's network for the conversion tests, written independently of ours.

``improved_state`` lists the parameters its ``UNetModel`` has for a set of flags (names and
shapes as its unet.py and script_util.py build them: numbered ``input_blocks`` and
``output_blocks`` of sequential layers, ``input_block_chans`` popped by the up path, the
downsampling rate ``ds`` deciding attention) and fills them with random values.
``improved_forward`` evaluates that network on such a state dict with torch.nn.functional
alone, finding its structure from the keys present. Neither touches ddpm's UNet or converter,
so the converted model is checked against a second, separate account of the same maths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MULTS = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}


def improved_shapes(f: dict) -> dict[str, tuple[int, ...]]:
    ch, n, emb = f["num_channels"], f["num_res_blocks"], 4 * f["num_channels"]
    mults, size = MULTS[f["image_size"]], f["image_size"]
    rates = {size // int(r) for r in f["attention_resolutions"].split(",")}
    shapes: dict[str, tuple[int, ...]] = {}

    def param(name: str, weight: tuple[int, ...], bias: bool = True) -> None:
        shapes[f"{name}.weight"] = weight
        if bias:
            shapes[f"{name}.bias"] = weight[:1]

    def resblock(name: str, c_in: int, c_out: int) -> None:
        param(f"{name}.in_layers.0", (c_in,))
        param(f"{name}.in_layers.2", (c_out, c_in, 3, 3))
        param(f"{name}.emb_layers.1", (2 * c_out if f["use_scale_shift_norm"] else c_out, emb))
        param(f"{name}.out_layers.0", (c_out,))
        param(f"{name}.out_layers.3", (c_out, c_out, 3, 3))
        if c_in != c_out:
            param(f"{name}.skip_connection", (c_out, c_in, 1, 1))

    def attention(name: str, c: int) -> None:
        param(f"{name}.norm", (c,))
        param(f"{name}.qkv", (3 * c, c, 1))  # 1-d convs
        param(f"{name}.proj_out", (c, c, 1))

    param("time_embed.0", (emb, ch))
    param("time_embed.2", (emb, emb))
    if f["class_cond"]:
        param("label_emb", (1000, emb), bias=False)
    param("input_blocks.0.0", (ch, 3, 3, 3))
    chans, c, ds, k = [ch], ch, 1, 1
    for level, mult in enumerate(mults):
        for _ in range(n):
            resblock(f"input_blocks.{k}.0", c, mult * ch)
            c = mult * ch
            if ds in rates:
                attention(f"input_blocks.{k}.1", c)
            chans.append(c)
            k += 1
        if level != len(mults) - 1:
            param(f"input_blocks.{k}.0.op", (c, c, 3, 3))
            chans.append(c)
            ds, k = ds * 2, k + 1
    resblock("middle_block.0", c, c)
    attention("middle_block.1", c)
    resblock("middle_block.2", c, c)
    k = 0
    for level, mult in reversed(list(enumerate(mults))):
        for i in range(n + 1):
            resblock(f"output_blocks.{k}.0", c + chans.pop(), ch * mult)
            c, layer = ch * mult, 1
            if ds in rates:
                attention(f"output_blocks.{k}.1", c)
                layer += 1
            if level and i == n:
                param(f"output_blocks.{k}.{layer}.conv", (c, c, 3, 3))
                ds //= 2
            k += 1
    param("out.0", (c,))
    param("out.2", (6 if f["learn_sigma"] else 3, ch, 3, 3))
    return shapes


def improved_state(f: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random parameters of improved-diffusion's UNetModel for the flag values ``f``; no layer
    zero (its zero-initialised convs would hide a mapping error), activations of unit scale."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in improved_shapes(f).items():
        value = torch.randn(shape, generator=gen)
        if len(shape) == 1:  # biases and norm parameters
            is_norm_weight = name.endswith("weight")
            value = (1.0 if is_norm_weight else 0.0) + 0.1 * value
        elif not name.startswith("label_emb"):
            value = value / math.sqrt(math.prod(shape[1:]))
        state[name] = value
    return state


def _gn(state: dict, name: str, h: torch.Tensor) -> torch.Tensor:
    return F.group_norm(h, 32, state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)


def _conv(state: dict, name: str, h: torch.Tensor, stride: int = 1) -> torch.Tensor:
    w = state[f"{name}.weight"]
    return F.conv2d(h, w, state[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2)


def _resblock(state: dict, name: str, h: torch.Tensor, emb: torch.Tensor, ss: bool):
    a = _conv(state, f"{name}.in_layers.2", F.silu(_gn(state, f"{name}.in_layers.0", h)))
    e = F.linear(F.silu(emb), state[f"{name}.emb_layers.1.weight"],
                 state[f"{name}.emb_layers.1.bias"])[:, :, None, None]  # fmt: skip
    if ss:
        scale, shift = e.chunk(2, dim=1)
        a = _gn(state, f"{name}.out_layers.0", a) * (1 + scale) + shift
    else:
        a = _gn(state, f"{name}.out_layers.0", a + e)
    a = _conv(state, f"{name}.out_layers.3", F.silu(a))  # dropout: eval
    skip = f"{name}.skip_connection"
    return (_conv(state, skip, h) if f"{skip}.weight" in state else h) + a


def _attention(state: dict, name: str, h: torch.Tensor, heads: int) -> torch.Tensor:
    b, c, height, width = h.shape
    flat = _gn(state, f"{name}.norm", h).reshape(b, c, -1)
    qkv = F.conv1d(flat, state[f"{name}.qkv.weight"], state[f"{name}.qkv.bias"])
    d = c // heads
    q, k, v = qkv.reshape(b, heads, 3, d, -1).unbind(dim=2)  # rows per head: q_h, k_h, v_h
    weights = torch.softmax(torch.einsum("bhds,bhdt->bhst", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("bhst,bhdt->bhds", weights, v).reshape(b, c, -1)
    out = F.conv1d(out, state[f"{name}.proj_out.weight"], state[f"{name}.proj_out.bias"])
    return h + out.reshape(b, c, height, width)


def _block(state, name, h, emb, f) -> torch.Tensor:
    """One of its sequential blocks: a ResBlock, attention, up- or downsampling, by its keys."""
    layer = 0
    if f"{name}.0.op.weight" in state:
        return _conv(state, f"{name}.0.op", h, stride=2)
    while any(k.startswith(f"{name}.{layer}.") for k in state):
        sub = f"{name}.{layer}"
        if f"{sub}.in_layers.0.weight" in state:
            h = _resblock(state, sub, h, emb, f["use_scale_shift_norm"])
        elif f"{sub}.qkv.weight" in state:
            h = _attention(state, sub, h, f["num_heads"])
        elif f"{sub}.conv.weight" in state:
            h = _conv(state, f"{sub}.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
        else:
            h = _conv(state, sub, h)
        layer += 1
    return h


def improved_forward(state: dict, f: dict, x, t, y=None) -> torch.Tensor:
    """Its model's output (eps, then the variance values with learn_sigma) at timesteps t:
    the network sees t * 1000 / T under rescale_timesteps, embedded as [cos, sin]."""
    ch = f["num_channels"]
    ts = t.float() * (1000.0 / f["diffusion_steps"]) if f["rescale_timesteps"] else t.float()
    half = ch // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = ts[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    emb = F.linear(emb, state["time_embed.0.weight"], state["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), state["time_embed.2.weight"], state["time_embed.2.bias"])
    if y is not None:
        emb = emb + state["label_emb.weight"][y]
    h, skips, k = x, [], 0
    while any(key.startswith(f"input_blocks.{k}.") for key in state):
        h = _block(state, f"input_blocks.{k}", h, emb, f)
        skips.append(h)
        k += 1
    h = _block(state, "middle_block", h, emb, f)
    k = 0
    while any(key.startswith(f"output_blocks.{k}.") for key in state):
        h = _block(state, f"output_blocks.{k}", torch.cat([h, skips.pop()], dim=1), emb, f)
        k += 1
    assert not skips
    return _conv(state, "out.2", F.silu(_gn(state, "out.0", h)))
