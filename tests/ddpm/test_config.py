import pytest
from pydantic import ValidationError

from ddpm.config import DiffusionConfig, UNetConfig


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"schedule": "cosin"}, "schedule", "'linear', 'cosine', 'sigmoid' or 'dns'"),
        ({"prediction": "noise"}, "prediction", "'eps', 'x0' or 'v'"),
        ({"loss": "huber"}, "loss", "'l2', 'l1', 'hybrid' or 'vlb'"),
        ({"timesteps": 1}, "timesteps", "greater than or equal to 2"),
        ({"min_snr_gamma": -1.0}, "min_snr_gamma", "greater than 0"),
    ],
)
def test_bad_diffusion_config_names_field_value_and_choices(kwargs, field, words):
    with pytest.raises(ValidationError) as info:
        DiffusionConfig(**kwargs)
    text = str(info.value)
    assert field in text and words in text and str(next(iter(kwargs.values()))) in text


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"image_size": 32, "channel_mults": (1, 2, 2, 2, 2, 2, 2)}, "divisible by 64"),
        ({"attention_resolutions": (3,)}, "attention_resolutions [3] are never reached"),
        ({"image_size": 64, "attention_resolutions": (4,)}, "[64, 32, 16, 8]"),
        ({"num_groups": 24}, "num_groups=24 does not divide 128"),
        ({"num_heads": 3}, "num_heads=3 does not divide"),
        ({"dropout": 1.0}, "less than 1"),
        ({"attention_type": "flash"}, "'softmax' or 'linear'"),
        ({"channels": 128}, "Extra inputs are not permitted"),
    ],
)
def test_bad_unet_config_is_refused_before_any_tensor(kwargs, words):
    with pytest.raises(ValidationError, match=None) as info:
        UNetConfig(**kwargs)
    assert words in str(info.value)


def test_resolutions_follow_the_levels():
    assert UNetConfig(image_size=64).resolutions == (64, 32, 16, 8)


def test_sampling_settings_a_model_cannot_honour_are_named():
    from ddpm.config import SamplerConfig

    guided = SamplerConfig(guidance_scale=3.0, variance="learned", steps=50)
    assert guided.problems(1000, conditional=True, learns_sigma=True) == []
    (line,) = guided.problems(1000, conditional=True, learns_sigma=True, null_class=False)
    assert "needs a null class" in line and "set it to 1.0" in line
    lines = guided.problems(20, conditional=False, learns_sigma=False)
    assert [w for w in ("steps=50", "unconditional", "learned") if any(w in x for x in lines)] == [
        "steps=50", "unconditional", "learned"
    ]  # fmt: skip
