import pytest
import torch
from torch import nn

from ddpm.ema import EMA, EMAConfig, ema_decay


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("table", torch.zeros(4))


def test_decay_warms_up_then_caps():
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay(1_000_000, 0.999) == 0.999
    assert ema_decay(0, 0.999, warmup=False) == 0.999


def test_update_is_the_exponential_moving_average():
    model = Net()
    ema = EMA(model, EMAConfig(decay=0.9, warmup=False))
    start = ema.module.lin.weight.clone()
    target = torch.randn_like(start)
    with torch.no_grad():
        model.lin.weight.copy_(target)
    for step in range(5):
        assert ema.update(model, step) == 0.9
    # Closed form after n updates towards a constant: w + d^n (w0 - w)
    torch.testing.assert_close(ema.module.lin.weight, target + 0.9**5 * (start - target))
    assert int(ema.num_updates) == 5


def test_buffers_are_copied_not_averaged():
    model = Net()
    ema = EMA(model, EMAConfig(decay=0.99, warmup=False))
    model.table.fill_(7.0)
    ema.update(model, 0)
    assert torch.equal(ema.module.table, torch.full((4,), 7.0))


def test_update_every_skips_steps_and_warmup_uses_update_count():
    model = Net()
    ema = EMA(model, EMAConfig(decay=0.999, update_every=4))
    decays = [ema.update(model, step) for step in range(9)]
    assert decays == [
        0.1,
        None,
        None,
        None,
        pytest.approx(2 / 11),
        None,
        None,
        None,
        pytest.approx(3 / 12),
    ]


def test_live_model_is_untouched_and_ema_is_frozen():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model)
    with torch.no_grad():
        ema.module.lin.weight.add_(1.0)
    ema.update(model, 0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_state_dict_round_trip_keeps_the_update_count():
    model = Net()
    ema = EMA(model)
    for step in range(3):
        model.lin.weight.data.add_(1.0)
        ema.update(model, step)
    restored = EMA(Net())
    restored.load_state_dict(ema.state_dict())
    assert int(restored.num_updates) == 3
    assert restored.current_decay == ema.current_decay
    assert torch.equal(restored.module.lin.weight, ema.module.lin.weight)
