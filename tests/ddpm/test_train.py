import math
from pathlib import Path

import pytest
import torch
from tiny import tiny_unet

from ddpm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ddpm.config import DiffusionConfig, EMAConfig, FidConfig, TrainConfig
from ddpm.data.synthetic import make_synthetic
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import DeterminismError, NonFiniteLossError
from ddpm.train import (
    Dataset,
    Hooks,
    fid_steps,
    lr_factor,
    train,
    validation_loss,
)
from ddpm.unet import UNet

TINY = tiny_unet(dropout=0.1)
DIFFUSION = DiffusionConfig(timesteps=100)


def short(**kw) -> TrainConfig:
    base = dict(
        steps=12,
        batch_size=8,
        lr=1e-3,
        warmup_steps=3,
        val_every=6,
        checkpoint_every=3,
        sample_every=1000,
        val_images=16,
        val_timesteps=3,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data() -> tuple[Dataset, Dataset]:
    split = make_synthetic(160, 16, seed=0)
    images = torch.from_numpy(split.images)
    return Dataset(images[:128]), Dataset(images[128:])


def run(tmp: Path, data, config: TrainConfig, unet=TINY, **kw):
    return train(
        unet,
        DIFFUSION,
        config,
        EMAConfig(decay=0.9),
        *data,
        checkpoint_dir=tmp,
        progress=False,
        log_every=3,
        hooks=kw.pop("hooks", Hooks(log=lambda m: None)),
        **kw,
    )


def test_training_on_the_synthetic_set_lowers_the_validation_loss(tmp_path, data):
    config = short(
        steps=150,
        batch_size=16,
        lr=2e-3,
        warmup_steps=10,
        val_every=50,
        checkpoint_every=50,
        val_images=32,
        val_timesteps=5,
    )
    curve: list[float] = []
    hooks = Hooks(
        on_metrics=lambda s, m: curve.append(m["val_loss"]) if "val_loss" in m else None,
        log=lambda m: None,
    )
    result, *_ = run(tmp_path, data, config, hooks=hooks)
    assert result.step == 150 and len(curve) == 3
    untrained = validation_loss(
        UNet(TINY),
        GaussianDiffusion(DIFFUSION),
        Dataset(data[1].images[:32].permute(0, 3, 1, 2)),
        num_timesteps=5,
        batch_size=16,
    )
    assert untrained == pytest.approx(1.0, abs=0.1)  # zero-initialised output: eps loss E[eps^2]
    assert curve[0] > curve[1] > curve[2] and curve[-1] < 0.3 * untrained, (untrained, curve)
    assert load_checkpoint(tmp_path / "best.pt")["best_val_loss"] == pytest.approx(min(curve))


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights_as_an_unbroken_one(tmp_path, data):
    unbroken, *_ = run(tmp_path / "a", data, short())
    full = load_checkpoint(tmp_path / "a" / "last.pt")

    def kill(step, metrics):
        if step == 9:  # after the checkpoint of step 9 is due but before it is written
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "b", data, short(), hooks=Hooks(on_metrics=kill, log=lambda m: None))
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 6
    messages: list[str] = []
    resumed, *_ = run(tmp_path / "b", data, short(), hooks=Hooks(log=messages.append))
    assert any("resumed from" in m and "at step 6" in m for m in messages), messages
    assert resumed.resumed_from_step == 6 and resumed.step == 12
    again = load_checkpoint(tmp_path / "b" / "last.pt")
    # Bit-exact on CPU: every random draw is a function of (seed, rank, step).
    for key in ("model", "ema"):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, again[key][name]), (key, name)
    assert again["optimizer"]["state"][0]["step"] == full["optimizer"]["state"][0]["step"]
    assert resumed.final_val_loss == unbroken.final_val_loss


def test_checkpoints_hold_no_rng_state_and_an_eight_gpu_one_resumes_here(tmp_path, data):
    """The format carried every visible GPU's RNG state, and restoring 8 of them on a machine
    with fewer raised IndexError; the loop seeds every step itself, so none is needed."""
    unbroken, *_ = run(tmp_path / "a", data, short())
    run(tmp_path / "b", data, short(steps=6))
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert "rng" not in ckpt
    eight_gpus = [torch.zeros(16, dtype=torch.uint8) for _ in range(8)]  # an old file's entry
    old = {**ckpt, "rng": {"torch": torch.get_rng_state(), "cuda": eight_gpus}}
    save_checkpoint(old, tmp_path / "b" / "last.pt")
    resumed, *_ = run(tmp_path / "b", data, short())
    assert resumed.resumed_from_step == 6
    full, again = (load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert all(torch.equal(t, again["model"][k]) for k, t in full["model"].items())
    assert resumed.final_val_loss == unbroken.final_val_loss


def test_a_best_validation_loss_of_zero_survives_a_resume(tmp_path, data):
    """0.0 is a loss like any other: a resumed run must not read it as "no best yet"."""
    run(tmp_path, data, short(steps=6))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    best = {**ckpt["best"], "val_loss": {**ckpt["best"]["val_loss"], "value": 0.0}}
    save_checkpoint({**ckpt, "best": best}, tmp_path / "last.pt")
    result, *_ = run(tmp_path, data, short(steps=12))
    assert result.resumed_from_step == 6 and result.best_val_loss == 0.0
    assert not (tmp_path / "best.pt").exists() or load_checkpoint(tmp_path / "best.pt")["step"] <= 6


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data):
    # An absurd learning rate blows the weights up after the first step.
    config = short(lr=1e30, warmup_steps=0, checkpoint_every=1, grad_clip=None)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+"):
        run(tmp_path, data, config)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] >= 1
    assert all(
        bool(torch.isfinite(v).all()) for v in ckpt["model"].values() if v.is_floating_point()
    )


def test_a_checkpoint_from_another_model_config_is_refused(tmp_path, data):
    run(tmp_path, data, short(steps=3))
    wider = TINY.model_copy(update={"base_channels": 32})
    with pytest.raises(CheckpointError, match=r"unet\.base_channels: checkpoint 16, params 32"):
        run(tmp_path, data, short(steps=6), unet=wider)
    result, *_ = run(tmp_path, data, short(steps=3), unet=wider, resume=False)
    assert result.resumed_from_step == 0


def test_a_truncated_checkpoint_is_an_error_not_a_fresh_start(tmp_path, data):
    run(tmp_path, data, short(steps=3))
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        run(tmp_path, data, short(steps=6))


def test_lr_warms_up_linearly_then_follows_its_schedule():
    config = short(steps=110, warmup_steps=10, lr_schedule="cosine")
    assert [lr_factor(s, config) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(60, config) == pytest.approx(0.5)
    assert lr_factor(110, config) == pytest.approx(0.0)
    assert lr_factor(60, short(steps=110, warmup_steps=10)) == 1.0


def test_early_stopping_ends_the_run_after_patience_validations_without_improvement(tmp_path, data):
    # A minimum improvement of 100 cannot be met after the first validation (best = inf).
    config = short(val_every=3, early_stopping_patience=2, early_stopping_min_delta=100.0)
    messages: list[str] = []
    result, *_ = run(tmp_path, data, config, hooks=Hooks(log=messages.append))
    assert result.stopped_early and result.step == 9  # improved at 3; no better at 6 and 9
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 9
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 3
    assert any("early stopping at step 9" in m for m in messages), messages
    patient, *_ = run(tmp_path / "patient", data, short(val_every=3, early_stopping_patience=3))
    assert not patient.stopped_early and patient.step == 12


def test_a_conditional_model_trains_on_labels_and_refuses_data_without_them(tmp_path):
    split = make_synthetic(48, 16, seed=0)
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels).long()
    conditional = TINY.model_copy(update={"num_classes": 4})
    labelled = (Dataset(images[:32], labels[:32]), Dataset(images[32:], labels[32:]))
    result, ema, _ = run(tmp_path, labelled, short(label_dropout=0.5), unet=conditional)
    assert result.step == 12 and math.isfinite(result.final_val_loss)
    assert ema.module.null_class == 4
    unlabelled = (Dataset(images[:32]), Dataset(images[32:]))
    with pytest.raises(ValueError, match="num_classes is set but the data set has no labels"):
        run(tmp_path / "b", unlabelled, short(), unet=conditional)


def test_deterministic_means_strict_not_a_warning(monkeypatch, strict_mode_restored):
    from ddpm.train import make_deterministic

    make_deterministic(torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    # CUDA: cuBLAS is deterministic only with a known workspace; set when unset, refused when off
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    make_deterministic(torch.device("cuda"))  # makes no CUDA call
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(DeterminismError, match=r"CUBLAS_WORKSPACE_CONFIG=:4096:8.*':0:0'"):
        make_deterministic(torch.device("cuda"))


def test_a_kernel_without_a_deterministic_version_stops_the_run_with_the_fix(
    tmp_path, data, monkeypatch, strict_mode_restored
):
    import ddpm.train

    def nondeterministic(*args, **kwargs):
        raise RuntimeError(
            "upsample_nearest2d_backward_out_cuda does not have a deterministic implementation, "
            "but you set 'torch.use_deterministic_algorithms(True)'. You can turn off ..."
        )

    monkeypatch.setattr(ddpm.train, "optimizer_step", nondeterministic)
    with pytest.raises(DeterminismError, match=r"upsample_nearest2d_backward_out_cuda does not "
                       r"have a deterministic implementation on cpu; set train.deterministic: "
                       r"false"):  # fmt: skip
        run(tmp_path, data, short(deterministic=True))


def test_a_deterministic_run_is_bit_identical_to_another(tmp_path, data, strict_mode_restored):
    runs = [run(tmp_path / name, data, short(steps=6, deterministic=True)) for name in "ab"]
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in "ab")
    assert all(torch.equal(t, b[k]) for k, t in a.items())
    assert runs[0].result.final_val_loss == runs[1].result.final_val_loss


def test_compile_wraps_the_ddp_module_not_the_other_way_round(tmp_path, data, monkeypatch):
    """torch.compile(DDP(model)): DDPOptimizer splits the graph at bucket boundaries so that
    all-reduce overlaps the backward; DDP(compile(model)) loses that."""
    import ddpm.train
    from ddpm.distributed import Distributed

    calls = []

    class Wrapped(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    def wrap(module):
        calls.append(("wrap", type(module).__name__))
        return Wrapped(module)

    def compile_(module):
        calls.append(("compile", type(module).__name__))
        return module

    monkeypatch.setattr(ddpm.train.torch, "compile", compile_)
    run(tmp_path, data, short(steps=3, compile=True), dist=Distributed(wrap=wrap))
    assert calls == [("wrap", "UNet"), ("compile", "Wrapped")]


def test_a_cosine_run_does_not_resume_with_another_length(tmp_path, data):
    """The cosine curve decays to zero at ``steps``: extending a finished run would restart it
    at about half the peak rate. The resume is refused with the reason and the fix."""
    run(tmp_path, data, short(steps=6, lr_schedule="cosine"))
    with pytest.raises(CheckpointError, match=r"train.steps=6 under a cosine.*--fresh"):
        run(tmp_path, data, short(steps=12, lr_schedule="cosine"))
    resumed, *_ = run(tmp_path, data, short(steps=6, lr_schedule="cosine"))
    assert resumed.resumed_from_step == 6  # the same length: nothing to do, nothing refused


def test_the_report_averages_each_term_and_the_loss_of_each_quarter_of_the_timesteps():
    from ddpm.train import step_terms, window_terms

    # T = 100: quarters [0, 25), [25, 50), [50, 75), [75, 100); nothing drawn in the third
    first = step_terms({"loss": torch.tensor([1.0, 3.0]), "mse": torch.tensor([1.0, 3.0]),
                        "vb": torch.tensor([0.5, 0.7])}, torch.tensor([0, 24]), 100)  # fmt: skip
    second = step_terms({"loss": torch.tensor([5.0, 7.0]), "mse": torch.tensor([4.0, 6.0]),
                         "vb": torch.tensor([0.1, 0.3])}, torch.tensor([30, 99]), 100)  # fmt: skip
    report = window_terms([first, second])
    assert report == pytest.approx({"mse": 3.5, "vb": 0.4, "loss_q0": 2.0, "loss_q1": 5.0,
                                    "loss_q3": 7.0})  # fmt: skip


class ScriptedScorer:
    """A scorer whose FID is scripted by step (the loop's bookkeeping is under test, not the
    metric), recording the steps and the network it was handed."""

    def __init__(self, fids: dict[int, float]) -> None:
        self.fids, self.calls = fids, []

    def __call__(self, step: int, model) -> dict[str, float]:
        self.calls.append((step, model))
        return {"fid": self.fids[step], "kid_mean": self.fids[step] / 100}


def fid_config(**kw) -> TrainConfig:
    fid = FidConfig(every=3, num_images=4, steps=2, batch_size=4)
    return short(**{"fid": fid, **kw})


def test_fid_is_evaluated_every_fid_every_steps_and_at_the_last_one():
    assert fid_steps(short(steps=10, fid=FidConfig(every=3))) == [3, 6, 9, 10]
    assert fid_steps(short(steps=9, fid=FidConfig(every=3))) == [3, 6, 9]
    assert fid_steps(short(steps=2, fid=FidConfig(every=5))) == [2]  # a short run: its end
    assert fid_steps(short(steps=9, fid=FidConfig(every=0))) == []


def test_best_by_fid_keeps_the_checkpoint_of_the_lowest_fid_and_stops_on_it(tmp_path, data):
    scorer = ScriptedScorer({3: 5.0, 6: 2.0, 9: 3.0, 12: 4.0})
    config = fid_config(best_by="fid", early_stopping_patience=2, val_every=100)
    result, ema, _ = run(tmp_path, data, config, scorer=scorer)
    assert [s for s, _ in scorer.calls] == [3, 6, 9, 12]
    assert all(model is ema.module for _, model in scorer.calls)  # the EMA weights
    assert (result.best_fid, result.best_fid_step, result.best_step) == (2.0, 6, 6)
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 6
    assert result.stopped_early and result.step == 12  # two evaluations without a gain
    # the validation loss still has its own best, which no longer decides best.pt
    assert math.isfinite(result.best_val_loss)


def test_best_by_val_loss_ignores_the_fid_for_best_pt(tmp_path, data):
    scorer = ScriptedScorer({3: 5.0, 6: 2.0, 9: 3.0, 12: 1.0})
    result, *_ = run(tmp_path, data, fid_config(), scorer=scorer)
    assert (result.best_fid, result.best_fid_step, result.best_by) == (1.0, 12, "val_loss")
    assert load_checkpoint(tmp_path / "best.pt")["step"] == result.best_step


def test_a_resumed_run_keeps_its_best_fid_and_evaluates_no_step_twice(tmp_path, data):
    scripted = {3: 5.0, 6: 2.0, 9: 3.0, 12: 4.0}
    first = ScriptedScorer(scripted)
    run(tmp_path, data, fid_config(steps=6, best_by="fid"), scorer=first)
    second = ScriptedScorer(scripted)
    result, *_ = run(tmp_path, data, fid_config(best_by="fid", early_stopping_patience=2),
                     scorer=second)  # fmt: skip
    assert [s for s, _ in first.calls] == [3, 6] and [s for s, _ in second.calls] == [9, 12]
    assert (result.best_fid, result.best_fid_step, result.resumed_from_step) == (2.0, 6, 6)
    assert result.stopped_early  # the misses count on across the resume


def test_the_cost_line_counts_the_fid_evaluations(tmp_path, data):
    lines = []
    scorer = ScriptedScorer(dict.fromkeys((3, 6, 9, 12), 1.0))
    run(tmp_path, data, fid_config(), scorer=scorer, hooks=Hooks(log=lines.append))
    (cost,) = [line for line in lines if line.startswith("cost:")]
    # measured after step 6 (the first after warm-up, then 5): the evaluations at 9 and 12
    assert "and 2 FID evaluations at about" in cost and "on top of training" in cost, cost


def test_fid_during_training_without_a_scorer_or_with_best_by_fid_off_is_refused(tmp_path, data):
    with pytest.raises(ValueError, match="needs a scorer"):
        run(tmp_path, data, fid_config())
    with pytest.raises(ValueError, match="best_by: fid needs FID during training"):
        short(best_by="fid")
