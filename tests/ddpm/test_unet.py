import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_unet
from torch import nn

from ddpm.config import UNetConfig
from ddpm.layers import (
    Attention,
    Dropout,
    LinearAttention,
    ResBlock,
    SinusoidalEmbedding,
    keep_mask,
)
from ddpm.sampling.denoiser import network_output
from ddpm.unet import UNet

# Two levels at 32 px, three at 64 px; attention at 16 px in both.
MULTS = {32: (1, 2), 64: (1, 2, 2)}


def tiny_config(image_size: int = 32, **overrides) -> UNetConfig:
    """The tests' tiny UNet at 32 or 64 px, with two heads and groups of four channels."""
    shape = {"image_size": image_size, "channel_mults": MULTS[image_size]}
    defaults = {"attention_resolutions": (16,), "num_heads": 2, "num_groups": 4}
    return tiny_unet(**(shape | defaults | overrides))


def perturb_(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Add noise to every parameter, so the zero-initialised layers stop hiding the others."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def inputs(config: UNetConfig, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    size = config.image_size
    x = torch.randn(batch, config.in_channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t


def tiny_net(*, perturbed: bool = True, image_size: int = 32, **overrides):
    """(model, x, t): a tiny UNet, moved off its zero init unless asked, and inputs for it."""
    config = tiny_config(image_size, **overrides)
    model = UNet(config)
    return (perturb_(model) if perturbed else model), *inputs(config)


@pytest.mark.parametrize("num_classes", [None, 5])
@pytest.mark.parametrize("attention_type", ["softmax", "linear"])
@pytest.mark.parametrize("image_size", [32, 64])
def test_output_has_the_shape_of_the_input(image_size, attention_type, num_classes):
    model, x, t = tiny_net(
        image_size=image_size, attention_type=attention_type, num_classes=num_classes
    )
    y = None if num_classes is None else torch.tensor([0, 4])
    out = model(x, t, y)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_default_config_is_the_ddpm_cifar10_network_with_35_7m_parameters():
    n = UNet(UNetConfig()).num_parameters()
    assert n == 35_746_307  # Ho et al. 2020's CIFAR-10 model, as diffusers' UNet2DModel counts it
    assert round(n / 1e6, 1) == 35.7


def test_class_conditioning_adds_one_embedding_row_per_class_plus_the_null_class():
    base = UNet(tiny_config()).num_parameters()
    conditional = UNet(tiny_config(num_classes=10)).num_parameters()
    assert conditional - base == (10 + 1) * 4 * 16


@pytest.mark.parametrize("attention_type", ["softmax", "linear"])
def test_output_is_zero_at_initialisation(attention_type):
    model, x, t = tiny_net(perturbed=False, attention_type=attention_type)
    assert torch.equal(model(x, t), torch.zeros_like(x))


def test_every_parameter_gets_a_gradient_once_the_zero_initialised_layers_have_moved():
    # Step 1 moves only the output conv; step 2 the zero-initialised convs of the residual
    # branches, which the skip connections reach; from the third backward on, all parameters
    # must get a gradient (none is dead or unused).
    config = tiny_config(num_classes=3, dropout=0.1)
    model = UNet(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t = inputs(config, batch=4)
    y = torch.tensor([0, 1, 2, 3])  # 3 is the null class: every embedding row is used
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(model(x, t, y), torch.randn_like(x)).backward()
        optimizer.step()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_different_labels_give_different_outputs():
    model, x, t = tiny_net(num_classes=3)
    out0 = model(x, t, torch.tensor([0, 0]))
    out1 = model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(out0, out1, atol=1e-4)


def test_missing_labels_mean_the_null_class():
    model, x, t = tiny_net(num_classes=3)
    assert model.null_class == 3
    null = torch.full((2,), model.null_class)
    torch.testing.assert_close(model(x, t), model(x, t, null))


def test_unconditional_model_has_no_null_class_and_rejects_labels():
    model, x, t = tiny_net(perturbed=False)
    assert model.null_class is None
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.tensor([0, 1]))


def test_timesteps_may_be_integers_or_floats():
    model, x, t = tiny_net()
    torch.testing.assert_close(model(x, t), model(x, t.float()))


def test_inputs_of_the_wrong_shape_are_rejected():
    model, x, t = tiny_net(perturbed=False)
    with pytest.raises(AssertionError, match="in_channels"):
        model(x[:, :2], t)
    with pytest.raises(AssertionError, match="t must have shape"):
        model(x, t[:1])


@pytest.mark.parametrize("attention_type", ["softmax", "linear"])
def test_channels_last_gives_the_same_output_and_gradients_as_contiguous(attention_type):
    model, x, t = tiny_net(attention_type=attention_type, num_heads=1)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = model(x, t)
    out_cl = model_cl(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    out_cl.square().sum().backward()
    for (name, p), p_cl in zip(model.named_parameters(), model_cl.parameters(), strict=True):
        torch.testing.assert_close(p_cl.grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("attention_type", ["softmax", "linear"])
def test_bf16_autocast_trains(attention_type):
    config = tiny_config(attention_type=attention_type, num_classes=2)
    model = perturb_(UNet(config)).to(memory_format=torch.channels_last)
    x, t = inputs(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.contiguous(memory_format=torch.channels_last), t, torch.tensor([0, 1]))
    assert out.shape == x.shape
    F.mse_loss(out.float(), x).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        reference = model(x, t, torch.tensor([0, 1]))
    assert (out.float() - reference).abs().mean() < 0.05 * reference.abs().mean()


def test_dropout_acts_in_training_only():
    model, x, t = tiny_net(dropout=0.5)
    model.eval()
    torch.testing.assert_close(model(x, t), model(x, t))
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))


# --- blocks --------------------------------------------------------------------------------


def test_sinusoidal_embedding_follows_the_ddpm_formula():
    t = torch.tensor([0, 1, 10, 999])
    emb = SinusoidalEmbedding(8)(t)
    freqs = 10000.0 ** (-torch.arange(4) / 3)
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected.float())
    assert SinusoidalEmbedding(9)(t).shape == (4, 9)


def test_the_improved_diffusion_embedding_puts_cos_first_on_rescaled_timesteps():
    """improved-diffusion: [cos, sin] of t * 1000 / T at frequencies 10000^(-i / half)."""
    T, t = 4000, torch.tensor([0, 1, 10, 3999])
    emb = SinusoidalEmbedding(8, shift=0.0, cos_first=True, scale=1000 / T)(t)
    args = (t[:, None] / 4.0) * 10000.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=1).float())


def test_a_conditional_unet_without_a_null_class_needs_labels():
    config = tiny_unet(num_classes=3, null_class=False)
    model = UNet(config)
    assert model.class_embed.num_embeddings == 3 and model.null_class is None
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    assert model(x, t, torch.tensor([0, 2])).shape == x.shape
    with pytest.raises(ValueError, match="no null class"):
        model(x, t)
    with pytest.raises(ValueError, match=r"guidance_scale=2\.0 needs a null class"):
        network_output(model, x, t, torch.tensor([0, 2]), guidance_scale=2.0)
    assert UNet(config.model_copy(update={"null_class": True})).class_embed.num_embeddings == 4


@pytest.mark.parametrize("in_ch, out_ch", [(8, 8), (8, 16)])
def test_resblock_is_its_shortcut_at_initialisation(in_ch, out_ch):
    block = ResBlock(in_ch, out_ch, emb_dim=12, num_groups=4)
    x, emb = torch.randn(2, in_ch, 8, 8), torch.randn(2, 12)
    torch.testing.assert_close(block(x, emb), block.skip(x))


@pytest.mark.parametrize("cls", [Attention, LinearAttention])
def test_attention_is_the_identity_at_initialisation(cls):
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(cls(8, num_heads=2, num_groups=4)(x), x)


def naive_attention(block: Attention, x: torch.Tensor, linear: bool) -> torch.Tensor:
    """O(N^2) reference: explicit (N, N) weights per head, then proj and residual."""
    B, C, H, W = x.shape
    heads, d = block.num_heads, C // block.num_heads
    qkv = block.qkv(block.norm(x)).reshape(B, 3, heads, d, H * W)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, d, N)
    if linear:
        sim = torch.einsum("bhdi,bhdj->bhij", F.elu(q) + 1, F.elu(k) + 1)  # (B, heads, N, N)
        weights = sim / sim.sum(dim=-1, keepdim=True)
    else:
        weights = torch.einsum("bhdi,bhdj->bhij", q, k).div(math.sqrt(d)).softmax(dim=-1)
    out = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(B, C, H, W)
    return x + block.proj(out)


@pytest.mark.parametrize("cls, linear", [(Attention, False), (LinearAttention, True)])
def test_attention_matches_a_naive_quadratic_reference(cls, linear):
    torch.manual_seed(0)
    block = perturb_(cls(8, num_heads=2, num_groups=4), std=0.2)
    x = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(block(x), naive_attention(block, x, linear), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [Attention, LinearAttention])
def test_attention_is_equivariant_to_permutations_of_the_pixels(cls):
    torch.manual_seed(0)
    block = perturb_(cls(8, num_heads=2, num_groups=4), std=0.2)
    x = torch.randn(2, 8, 4, 4)
    perm = torch.randperm(16)
    permuted_in = x.flatten(2)[..., perm].reshape_as(x)
    permuted_out = block(x).flatten(2)[..., perm].reshape_as(x)
    torch.testing.assert_close(block(permuted_in), permuted_out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_drops_a_share_p_and_is_unbiased(p):
    torch.manual_seed(0)
    x = torch.full((4, 64, 32, 32), 2.0)
    out = Dropout(p).train()(x)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5  # within 4 standard errors
    assert out.mean().item() == pytest.approx(2.0, rel=0.01)
    zero, kept = out.unique().tolist()
    assert zero == 0.0 and kept == pytest.approx(2.0 / (1 - p), rel=1e-4)


def test_cpu_dropout_mask_bits_are_uniform_in_every_lane():
    # Each 64-bit word yields three 16-bit integers; a stuck or biased lane would show here as a
    # drop share far from p among the elements that lane fills.
    torch.manual_seed(0)
    keep = keep_mask(torch.empty(300_000), 0.25).view(-1, 3)
    for lane in range(3):
        assert abs((~keep[:, lane]).float().mean().item() - 0.25) < 0.006


def test_cpu_dropout_gradient_is_the_same_mask_and_scale():
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    torch.manual_seed(3)
    out = Dropout(0.3).train()(x)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, out.detach() / x.detach())


def test_cpu_dropout_keeps_channels_last_and_follows_the_global_seed():
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    drop = Dropout(0.2).train()
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    b = drop(x)
    assert a.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b)
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_deterministic_upsampling_is_the_same_function_with_the_same_gradient(fmt):
    from ddpm.layers import nearest_x2

    x = torch.randn(2, 4, 5, 3).to(memory_format=fmt).requires_grad_()
    weights = torch.randn(2, 4, 10, 6)
    (expected,) = torch.autograd.grad((F.interpolate(x, scale_factor=2.0) * weights).sum(), x)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = nearest_x2(x)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(out, F.interpolate(x, scale_factor=2.0))
    assert torch.allclose(grad, expected, rtol=0, atol=1e-6)


def test_a_training_unet_is_one_graph_for_torch_compile():
    """Dropout's fast CPU mask draws in place, which dynamo cannot trace: under compile it
    gives way to nn.Dropout, so a training forward is one graph (it was 23 graph breaks, and
    the default network hit dynamo's recompile limit, 1.09x slower than eager)."""

    model = UNet(tiny_unet(dropout=0.1)).train()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16), torch.tensor([1, 5]))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
