"""The benchmark script's arithmetic and its GPU section, which no lent GPU has run yet: a dry
run on the CPU with a tiny UNet keeps it from rotting until one does. (No timings are checked:
speed is the script's job, not the tests'.)"""

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from ddpm.config import UNetConfig

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_vs_diffusers.py"
sys.path.insert(0, str(SCRIPT.parent))  # as when the script runs: its folder comes first
spec = importlib.util.spec_from_file_location("bench_vs_diffusers", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_mfu_is_three_forward_flops_per_image_over_the_peak():
    args = argparse.Namespace(gpu_batch=128, peak_tflops=1000.0)
    # 128 images in 0.1 s = 1,280 img/s; 3 x 12.1 GFLOP each = 46.5 TFLOP/s of 1,000: 4.6%.
    row = bench.gpu_row("x", {"ours": 0.1}, {"ours": int(12.1e9 * 128)}, {}, args)
    assert row.ours.rate == pytest.approx(1280)
    assert row.ours.mfu == pytest.approx(3 * 12.1e9 * 1280 / 1e15)  # 0.0465
    assert row.theirs is None and row.ratio is None and row.ours.step_gib is None
    # The numbers become text in one place, at the end.
    assert bench.cells(row) == ["x", "1,280 img/s, MFU 4.6%", "", "", ""]


def test_the_gpu_rows_run_end_to_end_and_are_judged_against_the_target():
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = UNetConfig(base_channels=32, attention_resolutions=(16,), num_groups=8)
    args = argparse.Namespace(gpu_batch=2, peak_tflops=989.0, warmup=1, iters=1, no_compile=True)
    rows = bench.gpu_rows(config, args, torch.device("cpu"))
    assert [r.what for r in rows] == [
        "GPU train bf16 eager, batch 2",
        "data feed (device), batch 2 (cpu)",
        "data feed (stream from disk), batch 2 (cpu)",
    ]
    eager, feed, stream = rows
    for figure in (eager.ours, eager.theirs):
        assert figure.seconds > 0 and figure.images == 2 and 0 < figure.mfu < 1
        assert math.isnan(figure.step_gib) and math.isnan(figure.total_gib)  # no CUDA counters
    assert eager.ratio == pytest.approx(eager.ours.seconds / eager.theirs.seconds)
    for row in (feed, stream):
        assert row.ratio == pytest.approx(row.ours.rate / eager.ours.rate)
    assert "MFU" in bench.cells(eager)[2] and "ours step peak nan GiB" in bench.cells(eager)[4]
    assert math.isnan(bench.peak_memory(lambda: None, torch.device("cpu"))[0])
    verdicts = bench.interpretation(rows, gpu=True)
    assert any(v.startswith("GPU training: best") and "not met" in v for v in verdicts), verdicts


def test_the_ddim_loop_rows_time_the_frontier_stage_and_diffusers_loop_side_by_side():
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = bench.UNet(UNetConfig(base_channels=32, num_groups=8))
    args = argparse.Namespace(sample_batch=2, sampler_steps=2)
    stage, loop = bench.ddim_loop_rows(model, args, torch.device("cpu"))
    assert (stage.key, loop.key) == ("frontier", "DDIM loop")
    assert stage.ours.images == stage.theirs.images == 2 and stage.ratio > 0
    assert loop.ours.seconds == stage.theirs.seconds  # ours vs diffusers: the plain loop
    assert loop.ratio == pytest.approx(loop.ours.seconds / loop.theirs.seconds)
    (verdict,) = bench.ddim_loop_verdict([stage, loop])
    assert "goal <= 0.8" in verdict and "plain DDIM loop" in verdict


def test_each_benchmark_rewrites_only_its_own_section_of_the_results(tmp_path):
    from results import write_section

    path = tmp_path / "RESULTS.md"
    write_section(path, "unet", "# UNet\n| a |")
    write_section(path, "prepare", "## Prepare\n| b |")
    write_section(path, "unet", "# UNet\n| c |")
    text = path.read_text()
    assert "| a |" not in text and "| c |" in text and "| b |" in text
    assert text.index("| c |") < text.index("| b |")  # in place, not moved to the end


def test_the_prepare_benchmark_measures_three_ways_of_preparing_a_folder(tmp_path):
    prepare = pytest.importorskip("bench_prepare")
    prepare.main(["--images", "30", "--workers", "2", "--folder", str(tmp_path / "folder"),
                  "--results", str(tmp_path / "RESULTS.md")])  # fmt: skip
    table = (tmp_path / "RESULTS.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "img/s" in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| in memory, 1 process", "| on disk, 1 process", "| on disk, 2 processes"
    ]  # fmt: skip
    assert all(r.split(" | ")[1] == "30" for r in rows)  # every image prepared, every way
    assert rows[2].split(" | ")[5].endswith("MiB")  # the workers' peak was measured
