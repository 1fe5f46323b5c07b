import math

import torch

from bias_begets_bias.modules import EMA, ConditionalUNet, SelfAttention, UNetConfig, sinusoidal_embedding


def test_paper_unet_has_the_original_parameter_count():
    model = ConditionalUNet(UNetConfig.paper())
    assert sum(p.numel() for p in model.parameters()) == 23_332_739


def test_sinusoidal_embedding_by_hand():
    emb = sinusoidal_embedding(torch.tensor([0, 1]), 4)  # frequencies 1 and 1/100
    expected = torch.tensor([[0, 0, 1, 1], [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]])
    assert torch.allclose(emb, expected, atol=1e-6)


def test_unconditional_rows_have_a_zero_word_half():
    model = ConditionalUNet(UNetConfig(image_size=8, widths=(4, 8, 8, 8), bottleneck=8, attention=(0,) * 6,
                                       norm_groups=1, word_scale=3.0))
    t = torch.tensor([5, 5])
    emb = model.conditioning(t, None)
    assert emb.shape == (2, 256) and torch.all(emb[:, 128:] == 0)
    words = torch.ones(2, 128)
    assert torch.all(model.conditioning(t, words)[:, 128:] == 3.0)  # scaled word half
    assert torch.equal(model.conditioning(t, torch.zeros(2, 128)), emb)


def test_sdpa_attention_matches_the_explicit_softmax_formula():
    torch.manual_seed(0)
    block = SelfAttention(8, heads=2)
    x = torch.randn(2, 8, 3, 3)
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = block.qkv(block.norm(tokens)).chunk(3, dim=-1)
    heads = lambda z: z.view(2, 9, 2, 4).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4), dim=-1)
    attended = (weights @ heads(v)).transpose(1, 2).reshape(2, 9, 8)
    out = tokens + block.proj(attended)
    out = out + block.ff(out)
    assert torch.allclose(block(x), out.transpose(1, 2).reshape(2, 8, 3, 3), atol=1e-5)


def test_ema_copies_during_warm_up_then_averages():
    model, ema_model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    ema = EMA(beta=0.9, warmup_steps=1)
    model.weight.data.fill_(2.0)
    ema_model.weight.data.fill_(0.0)
    ema.update(ema_model, model, step=0)
    assert ema_model.weight.item() == 2.0  # copied
    model.weight.data.fill_(4.0)
    ema.update(ema_model, model, step=1)
    assert abs(ema_model.weight.item() - (0.9 * 2.0 + 0.1 * 4.0)) < 1e-6


def test_forward_shapes_for_a_small_config():
    config = UNetConfig(image_size=16, widths=(8, 16, 16, 16), bottleneck=16, attention=(1, 0, 1, 0, 1, 0),
                        norm_groups=4, cond_mlp=True)
    model = ConditionalUNet(config)
    out = model(torch.randn(3, 3, 16, 16), torch.tensor([0, 10, 999]), torch.randn(3, 128))
    assert out.shape == (3, 3, 16, 16) and torch.isfinite(out).all()


def test_scale_shift_conditioning_by_hand():
    """h * (1 + scale) + shift with scale_shift (AdaGN), h + shift without."""
    from bias_begets_bias.modules import Conditioned

    h, emb = torch.full((1, 2, 1, 1), 3.0), torch.zeros(1, 4)
    film = Conditioned(2, 4, scale_shift=True)
    with torch.no_grad():
        film.emb[1].weight.zero_()
        film.emb[1].bias.copy_(torch.tensor([0.5, -1.0, 10.0, 20.0]))  # scales 0.5, -1; shifts 10, 20
    assert torch.equal(film(h, emb).flatten(), torch.tensor([3 * 1.5 + 10, 3 * 0.0 + 20]))
    shift_only = Conditioned(2, 4, scale_shift=False)
    with torch.no_grad():
        shift_only.emb[1].weight.zero_()
        shift_only.emb[1].bias.copy_(torch.tensor([1.0, 2.0]))
    assert torch.equal(shift_only(h, emb).flatten(), torch.tensor([4.0, 5.0]))


def test_bottleneck_conditioning_adds_one_film_per_bottleneck_conv_and_nothing_else():
    """bottleneck_cond adds Linear(emb_dim, 2 * ch) (AdaGN scale and shift) after each of the three
    bottleneck convs, ch = bottleneck, bottleneck, widths[3]: (256 + 1) * 2 * (192 + 192 + 96)
    parameters for tiny's shape; the original keys stay as they were (old checkpoints load), and with
    the new layers' weights zero and biases zero the network computes exactly what it did without them."""
    shape = dict(image_size=16, widths=(16, 32, 96, 96), bottleneck=192, attention=(0, 1, 1, 1, 0, 0), norm_groups=8,
                 word_scale=8.0, cond_mlp=True, scale_shift=True)
    torch.manual_seed(0)
    plain = ConditionalUNet(UNetConfig(**shape))
    with_bottleneck = ConditionalUNet(UNetConfig(**shape, bottleneck_cond=True))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(with_bottleneck) - count(plain) == (256 + 1) * 2 * (192 + 192 + 96)
    missing, unexpected = with_bottleneck.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(key.startswith("bot_cond.") for key in missing)
    with torch.no_grad():
        for film in with_bottleneck.bot_cond:
            film.emb[1].weight.zero_()
            film.emb[1].bias.zero_()
    x, t, words = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), torch.randn(2, 128)
    assert torch.allclose(with_bottleneck(x, t, words), plain(x, t, words), atol=1e-6)
