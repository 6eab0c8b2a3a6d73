"""The train stage through its CLI: outputs, MLflow (SQLite and a real server), DDP, errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from stages import merge, prepare_split, project_params
from typer.testing import CliRunner

from ddpm.checkpoint import load_checkpoint
from pipeline.cli import app
from pipeline.projection import CURVES, curve_rows
from pipeline.train import Curves

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]  # this checkout's code in a subprocess run elsewhere

PARAMS = project_params(
    {
        "dataset": "synthetic",
        "image_size": 16,
        "seed": 0,
        "data": {"num_images": 120},
        "model": {
            "base_channels": 16,
            "channel_mults": [1, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [8],
            "num_groups": 8,
        },
        "diffusion": {"timesteps": 50},
        "sample": {"steps": 10},
        "train": {
            "steps": 8,
            "batch_size": 4,
            "warmup_steps": 2,
            "val_every": 4,
            "checkpoint_every": 4,
            "sample_every": 8,
            "sample_images": 4,
            "sample_steps": 3,
            "val_images": 8,
            "val_timesteps": 2,
        },
    }
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_split(tmp_path_factory.mktemp("prepared"), PARAMS)


@pytest.fixture
def project(tmp_path, prepared, monkeypatch) -> Path:
    """A project folder with prepared data and params; the cwd and the MLflow store are in it."""
    shutil.copytree(prepared, tmp_path / "data" / "prepared")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_run(uri: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ddpm")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.steps"] == "8" and run.data.params["schedule"] == "linear"
    assert run.data.params["model.channel_mults"] == "[1, 2]"
    assert run.data.tags["git_commit"] and run.data.tags["stage.train"] == "done"
    assert run.data.metrics["train/steps"] == 8
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [4, 8]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/val_loss")] == [4, 8]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"weights", "previews", "curves"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "weights/ema.pt", str(tmp_path / "dl"))
    assert "ema" in load_checkpoint(Path(local))
    # The runs table's Dataset column: the prepared train split, its sha256 as digest
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    manifest = json.loads((tmp_path / "data" / "prepared" / "manifest.json").read_text())
    assert dataset.name == "synthetic-train"
    assert dataset.digest == manifest["splits"]["train"]["images_sha256"][:16]
    assert "ddpm.data.synthetic" in dataset.source
    assert json.loads(dataset.profile)["num_images"] == manifest["splits"]["train"]["count"]
    # The UI opens this experiment on its runs table, not the GenAI pages
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_train_writes_checkpoints_metrics_curves_and_an_mlflow_run(project):
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    assert "starting fresh" in result.output
    summary = json.loads((project / "metrics" / "train.json").read_text())
    assert summary["steps"] == 8 and summary["best_val_loss"] <= summary["final_val_loss"] + 1e-9
    curve = (project / "metrics" / "train_curve.tsv").read_text().splitlines()
    assert curve[0].split("\t")[:2] == ["step", "loss"] and len(curve) == 3
    assert (project / "metrics" / "val_curve.tsv").read_text().splitlines()[1].startswith("4\t")
    # l2: the loss is L_simple, so mse is the loss; the bound's curve has a header only
    terms = (project / "metrics" / "loss_terms.tsv").read_text().splitlines()
    assert terms[0].split("\t") == ["step", "mse", "loss_q0", "loss_q1", "loss_q2", "loss_q3"]
    losses = {row.split("\t")[0]: row.split("\t")[1] for row in curve[1:]}
    assert terms[1:] and all(row.split("\t")[1] == losses[row.split("\t")[0]] for row in terms[1:])
    assert (project / "metrics" / "vb_curve.tsv").read_text() == "step\tvb\n"
    weights = load_checkpoint(project / "models" / "ema.pt")
    assert weights["step"] == 8 and weights["config"]["unet"]["base_channels"] == 16
    assert set(weights["ema"]) == {f"module.{k}" for k in weights["model"]} | {"num_updates"}
    (run_dir,) = (project / "models" / "checkpoints").iterdir()
    assert (run_dir / "previews" / "step_0000008.png").stat().st_size
    check_run(f"sqlite:///{project / 'mlflow.db'}", project)

    # Run again with more steps: it resumes, says so, and extends the same curve
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["steps"] = 12
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    assert f"resumed from models/checkpoints/{run_dir.name}/last.pt at step 8" in result.output
    steps = [
        r.split("\t")[0] for r in (project / "metrics/train_curve.tsv").read_text().split("\n")
    ]
    assert steps[1:-1] == ["4", "8", "12"]


def test_train_logs_to_a_real_mlflow_server(project, monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{project / 'server.db'}",
            "--artifacts-destination", str(project / "server-artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not start in 90 s"
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        result = runner.invoke(app, ["train"])
        assert result.exit_code == 0, result.output
        check_run(uri, project)
        assert not (project / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_an_unreachable_tracking_server_does_not_stop_training(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    assert result.output.count("MLflow tracking is off") == 1
    assert json.loads((project / "metrics" / "train.json").read_text())["steps"] == 8


def test_a_changed_model_config_trains_anew_and_refuses_the_old_checkpoint(project):
    assert runner.invoke(app, ["train"]).exit_code == 0
    (old,) = (project / "models" / "checkpoints").iterdir()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["base_channels"] = 32
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    # As `dvc exp run -S model.base_channels=32` would: a new run in its own folder
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    assert "starting fresh" in result.output
    assert len(list((project / "models" / "checkpoints").iterdir())) == 2
    # Resuming the old checkpoint explicitly is refused, naming the difference
    result = runner.invoke(app, ["train", "--resume-from", str(old / "last.pt")])
    assert result.exit_code == 1
    assert "unet.base_channels: checkpoint 16, params 32" in result.output
    assert "Traceback" not in result.output


def test_ddp_with_two_gloo_processes_trains_and_only_rank_zero_writes(project, inception_weights):
    """Two processes, one job: one checkpoint and one run; the importance sampler's history
    holds both processes' losses, and FID during training both processes' images
    (all_gather)."""
    fid = {"every": 4, "num_images": 6, "steps": 2, "batch_size": 2, "reference_split": "val"}
    params = merge(PARAMS, {"train": {"timestep_sampler": "loss-second-moment", "fid": fid}})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_DEVICE": "cpu",
           "DDPM_INCEPTION_WEIGHTS": str(inception_weights)}  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "pipeline.cli", "train",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("starting fresh") == 1
    summary = json.loads((project / "metrics" / "train.json").read_text())
    assert summary["effective_batch_size"] == 8 and summary["steps"] == 8
    (run_dir,) = (project / "models" / "checkpoints").iterdir()
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["step"] == 8 and not any("module." in k for k in ckpt["model"])
    assert int(ckpt["timestep_sampler"]["count"].sum()) == 8 * 4 * 2  # steps x batch x ranks
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert len(runs) == 1
    assert torch.isfinite(torch.tensor(summary["final_val_loss"]))
    rows = curve_rows(project / "metrics" / "fid_curve.tsv")["train/fid"]
    assert [s for s, _ in rows] == [4, 8] and summary["best_fid_step"] in (4, 8)
    assert (done.stdout + done.stderr).count("fid: step 4") == 1  # rank 0 says it


def test_a_truncated_last_checkpoint_stops_the_stage_with_one_clear_line(project):
    """The stage reads last.pt once, through the library's loader: a file cut short by a
    crash is named, with the fix, instead of a traceback (or a silent fresh start)."""
    assert runner.invoke(app, ["train"]).exit_code == 0
    (run_dir,) = (project / "models" / "checkpoints").iterdir()
    last = run_dir / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    relative = last.relative_to(project)
    assert f"{relative} is not a readable checkpoint" in " ".join(result.output.split())
    assert "it may be truncated" in result.output


def test_two_nodes_meeting_at_a_rendezvous_endpoint_train_as_one_job(project):
    """Two torchrun launches, one per "node" (one gloo process each), meet at a c10d
    rendezvous endpoint: the command a two-machine job runs, on this machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_DEVICE": "cpu"}
    endpoint = f"127.0.0.1:{free_port()}"

    def node(rank: int) -> subprocess.Popen:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc_per_node", "1", "--node_rank", str(rank), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", endpoint, "--rdzv_id", "two-nodes", "-m", "pipeline.cli", "train",
        ]  # fmt: skip
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip

    nodes = [node(0), node(1)]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(logs)
    assert "".join(logs).count("starting fresh") == 1  # one global rank 0 speaks
    summary = json.loads((project / "metrics" / "train.json").read_text())
    assert summary["effective_batch_size"] == 8 and summary["steps"] == 8


def test_in_a_log_training_prints_plain_progress_lines_and_its_cost(project):
    """stderr redirected, as under dvc repro or CI: no carriage-return bar updates, a line every
    5% at most, and before the long part a line that says what the run will cost."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(steps=200, val_every=100, checkpoint_every=100, sample_every=200)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "DDPM_DEVICE": "cpu"}
    with open(project / "train.log", "w") as log:
        cmd = [sys.executable, "-m", "pipeline.cli", "train"]
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    text = (project / "train.log").read_text()
    assert done.returncode == 0, text
    assert "\r" not in text
    progress = [line for line in text.splitlines() if line.startswith("train: ")]
    assert 2 <= len(progress) <= 21, progress
    assert progress[-1].startswith("train: 200/200 step (100%)") and "ETA" in progress[0]
    (cost,) = [line for line in text.splitlines() if line.startswith("cost: ")]
    assert "200 steps, 194 to go at" in cost and "s/step on cpu" in cost


def test_a_resumed_curve_is_cut_at_the_resumed_step_and_an_older_file_gains_the_new_column(
    tmp_path,
):
    """A checkpoint folder from before ema_decay was a column resumes: its rows keep their
    values under the new header, the missing column reads nan, rows past the step go."""
    (tmp_path / "train_curve.tsv").write_text(
        "step\tloss\tlr\tgrad_norm\timages_per_second\n2\t0.5\t0.001\t1.5\t90\n4\t0.4\t0.001\t1\t95\n"
    )
    curves = Curves(tmp_path, resume_step=2)
    rows = (tmp_path / "train_curve.tsv").read_text().splitlines()
    assert rows == ["\t".join(CURVES["train_curve.tsv"]), "2\t0.5\t0.001\t1.5\t90\tnan"]
    assert (tmp_path / "val_curve.tsv").read_text() == "step\tval_loss\n"
    written = curves.append(6, {"loss": 0.123456789, "lr": 1e-3, "grad_norm": 2.0,
                                "images_per_second": 100.0, "ema_decay": 0.999})  # fmt: skip
    assert written["loss"] == 0.123457  # what MLflow gets is what the file holds
    assert curve_rows(tmp_path / "train_curve.tsv")["train/loss"] == [(2, 0.5), (6, 0.123457)]


def test_every_problem_with_the_inputs_is_reported_at_once(project):
    """Data prepared at 16 px, params asking for 8 px: each split's problem on a line of its
    own, before any work."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["image_size"] = 8
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1, result.output
    listed = result.output.split("the train stage cannot start, 2 problems:\n")[1].splitlines()
    assert listed == [
        f"  - the prepared {split} images are 16x16, not image_size=8: prepare the data again "
        "(dvc repro prepares it first)"
        for split in ("train", "val")
    ]
    assert not (project / "models").exists()


FID = {"every": 4, "num_images": 8, "steps": 2, "batch_size": 8, "reference_split": "val"}
FID_ON = {"train": {"best_by": "fid", "fid": FID}}


def use_params(project: Path, *overrides: dict) -> None:
    params = PARAMS
    for override in overrides:
        params = merge(params, override)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def test_fid_during_training_writes_its_curve_the_run_and_best_pt_and_resumes_whole(
    project, inception_weights, monkeypatch
):
    """train.fid every 4 steps of 8, then 4 more: one row and one MLflow point per
    evaluation, none lost or doubled by the resume; best.pt is the lowest FID's step; and the
    run of an experiment whose train stage DVC restored holds the same curves and summary."""
    monkeypatch.setenv("DDPM_INCEPTION_WEIGHTS", str(inception_weights))
    use_params(project, FID_ON)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    assert "FID evaluations at about" in result.output  # the cost line counts them
    use_params(project, FID_ON, {"train": {"steps": 12}})  # steps may grow: it resumes
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0 and "resumed from" in result.output, result.output
    rows = curve_rows(project / "metrics" / "fid_curve.tsv")
    assert [s for s, _ in rows["train/fid"]] == [4, 8, 12]
    assert [s for s, _ in rows["train/kid_mean"]] == [4, 8, 12]
    summary = json.loads((project / "metrics" / "train.json").read_text())
    fid, step = min((v, s) for s, v in rows["train/fid"])
    assert summary["best_by"] == "fid" and summary["best_fid_step"] == step
    assert summary["best_fid"] == pytest.approx(fid, rel=1e-5) and summary["best_step"] == step
    (run_dir,) = (project / "models" / "checkpoints").iterdir()
    assert load_checkpoint(run_dir / "best.pt")["step"] == step
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    (run,) = [r for r in runs if r.data.params["train.steps"] == "12"]  # the resumed one
    for name in ("train/fid", "train/kid_mean"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [4, 8, 12], name  # none doubled
        logged = dict(rows[name])
        assert all(m.value == pytest.approx(logged[m.step], rel=1e-5) for m in history)
    assert run.data.metrics["train/best_fid"] == pytest.approx(fid, rel=1e-5)
    # another experiment of these params, whose train stage DVC restored: track projects the
    # files into its run, which holds the FID curves and summary the run that trained holds
    monkeypatch.setenv("DVC_EXP_NAME", "restored")
    result = runner.invoke(app, ["track"])
    assert result.exit_code == 0, result.output
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    (restored,) = [r for r in runs if r.info.run_name == "restored"]
    assert restored.data.tags["stage.train"] == "restored"
    for name in ("train/fid", "train/kid_mean", "train/loss"):
        ours, theirs = (sorted((m.step, m.value) for m in client.get_metric_history(r, name))
                        for r in (restored.info.run_id, run.info.run_id))  # fmt: skip
        assert ours == theirs, name
    summary = {k: v for k, v in run.data.metrics.items() if k.startswith("train/")}
    assert {"train/best_fid", "train/best_fid_step"} <= set(summary)
    assert {k: restored.data.metrics[k] for k in summary} == summary


def test_fid_during_training_without_weights_or_reference_images_is_refused_before_training(
    project, monkeypatch
):
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    too_many = {"train": {"fid": {"num_images": 50}}}
    use_params(project, FID_ON, too_many, {"inception_weights": "no/such/inception.pth"})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "2 problems" in message and "starting fresh" not in message
    assert "no/such/inception.pth: no such file" in message and "inception_weights" in message
    assert "train.fid.num_images=50 needs 50 val images" in message
    assert "lower train.fid.num_images to 12" in message


def test_fid_images_shared_out_over_processes_are_the_one_process_images(
    prepared, inception_weights
):
    """The sharding's index arithmetic: three processes' shares, gathered (as all_gather
    concatenates them in rank order), are the one-process images, in order."""
    from ddpm.data.prepared import load_prepared
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.distributed import Distributed
    from ddpm.unet import UNet
    from pipeline.quality import TrainFid, fid_extraction
    from pipeline.settings import Machine, Params

    p = Params.model_validate(merge(PARAMS, FID_ON))
    config = p.train.fid.model_copy(update={"num_images": 7, "batch_size": 2})
    model = UNet(p.unet_config()).eval()
    split = load_prepared(prepared, "val")
    extraction = fid_extraction(Machine(), str(inception_weights))

    def scorer(dist: Distributed) -> TrainFid:
        return TrainFid(config, p.seed, GaussianDiffusion(p.diffusion_config()), split,
                        extraction, dist, torch.device("cpu"), Path("unused"))  # fmt: skip

    alone = scorer(Distributed()).sample(model)
    shares = [scorer(Distributed(rank=r, world_size=3)).sample(model) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]  # 7 images: blanks pad ranks 1 and 2
    together = Distributed(world_size=3, gather=lambda _: torch.cat(shares))
    gathered = scorer(together).gather(shares[0])
    assert gathered.shape == alone.shape and torch.equal(gathered, alone)


def test_a_run_killed_on_one_machine_resumes_bit_identically_from_ddpm_checkpoint_dir(
    project, tmp_path_factory, monkeypatch
):
    """A spot machine vanishes mid-run (SIGKILL after a checkpoint); a fresh copy of the
    project (no models/) pointed at the same DDPM_CHECKPOINT_DIR resumes there and ends with
    the weights of an unbroken run, which keeps its checkpoints in models/checkpoints/."""
    params = merge(PARAMS, {"train": {"steps": 16, "val_every": 8, "sample_every": 16}})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    shared = tmp_path_factory.mktemp("bucket") / "checkpoints"
    killed, fresh = tmp_path_factory.mktemp("killed"), tmp_path_factory.mktemp("fresh")
    for copy in (killed, fresh):
        shutil.copytree(project / "data", copy / "data")
        shutil.copy2(project / "params.yaml", copy / "params.yaml")
    monkeypatch.setenv("DDPM_TRACKING", "false")  # not what this test is about: 10 s less
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_NUM_THREADS": "1", "DDPM_DEVICE": "cpu",
           "DDPM_CHECKPOINT_DIR": str(shared), "DVC_ROOT": str(killed),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, "-m", "pipeline.cli", "train"]
    machine = subprocess.Popen(cmd, cwd=killed, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(shared.glob("*/last.pt")) and machine.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.01)
    machine.kill()
    assert machine.wait() != 0, "the run ended before it could be killed"
    assert not (killed / "models" / "ema.pt").exists()

    threads = torch.get_num_threads()
    monkeypatch.setenv("DDPM_NUM_THREADS", "1")  # the killed run's float sums
    try:
        monkeypatch.chdir(fresh)
        monkeypatch.setenv("DVC_ROOT", str(fresh))
        monkeypatch.setenv("DDPM_CHECKPOINT_DIR", str(shared))
        resumed = runner.invoke(app, ["train"])
        monkeypatch.chdir(project)
        monkeypatch.setenv("DVC_ROOT", str(project))
        monkeypatch.delenv("DDPM_CHECKPOINT_DIR")
        unbroken = runner.invoke(app, ["train"])
    finally:
        torch.set_num_threads(threads)
    assert resumed.exit_code == 0 == unbroken.exit_code, resumed.output + unbroken.output
    (line,) = [line for line in resumed.output.splitlines() if "resumed from" in line]
    step = int(line.split(" at step ")[1].split()[0])
    assert 0 < step < 16 and str(shared) in " ".join(resumed.output.split()), line
    assert not (fresh / "models" / "checkpoints").exists()
    (run_dir,) = (project / "models" / "checkpoints").iterdir()
    assert (shared / run_dir.name / "last.pt").is_file()  # the same key: one training run
    a, b = (load_checkpoint(p / "models" / "ema.pt") for p in (fresh, project))
    assert a["step"] == b["step"] == 16
    for entry in ("model", "ema"):
        assert a[entry].keys() == b[entry].keys()
        for key, value in a[entry].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[entry][key])), key


@pytest.mark.parametrize("where", ["a-file/checkpoints", "a-file"])
def test_a_checkpoint_dir_that_cannot_be_written_is_refused_before_training(project, monkeypatch,
                                                                            where):  # fmt: skip
    """DDPM_CHECKPOINT_DIR under a file (or a file itself, as a bucket that failed to mount
    can leave behind): one line naming the folder, before any training step."""
    (project / "a-file").write_text("not a folder")
    monkeypatch.setenv("DDPM_TRACKING", "false")
    monkeypatch.setenv("DDPM_CHECKPOINT_DIR", str(project / where))
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    message = " ".join(result.output.split())
    assert f"DDPM_CHECKPOINT_DIR {project / where} cannot be written" in message, message
    assert "starting fresh" not in result.output and not (project / "models").exists()
