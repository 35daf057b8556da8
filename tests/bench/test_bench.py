"""The benchmarks in bench/: the training-step bench smoke-tested at tiny size (the table comes out with sane
numbers), and the one file of full-size architectures both benches build from.

The smoke test runs the real script (real subprocesses, real TrainStep, real reference loop) on the tiny
architecture; the full-size cases are benchmarks, not tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import train_bench as bench  # noqa: E402


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "bench" / "train_bench.py"), *args], cwd="/", env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = run_script("--case", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1", "--json", str(out),
                      "--count-ops", "--profile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_table_has_both_loops_and_a_ratio(tiny_run):
    stdout, _ = tiny_run
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    for column in ("model", "res", "batch", "precision", "optimizer", "steps/s", "samples/s", "peak mem", "MFU",
                   "ours/ref"):
        assert column in header
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]
    assert [r["loop"] for r in rows] == ["ours", "reference"]
    ours, ref = rows
    for r in rows:
        assert (r["model"], r["res"], r["batch"], r["precision"], r["optimizer"]) == ("tiny", "64", "2", "no", "adamw")
        assert r["peak mem"].endswith("RSS")
        assert r["MFU"] == "-"  # no MFU on a CPU: there is no matmul peak to divide by
    ratio = float(ours["ours/ref"].rstrip("x"))
    assert ratio == pytest.approx(float(ours["steps/s"]) / float(ref["steps/s"]), rel=0.02)


@pytest.mark.slow
def test_numbers_are_sane(tiny_run):
    _, results = tiny_run
    (row,) = results["rows"]
    for loop in ("ours", "reference"):
        r = row[loop]
        assert r["steps"] == 3 and len(r["step_seconds"]) == 3
        assert all(0 < s < 120 for s in r["step_seconds"])
        assert r["samples_per_s"] == pytest.approx(2 * r["steps_per_s"])
        # A process holding torch, diffusers and the tiny models: more than 100 MiB, far below 8 GiB.
        assert r["peak_kind"] == "RSS" and 100 * 2**20 < r["peak_bytes"] < 8 * 2**30
        assert r["loss"] == r["loss"] and 0 < r["loss"] < 100  # finite: the steps really trained
    assert row["ratio"] == pytest.approx(row["ours"]["steps_per_s"] / row["reference"]["steps_per_s"])


def test_bad_options_are_one_line_errors(capsys):
    assert bench.run(["--case", "no-such-case", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --case: unknown case no-such-case (see --list)"]
    assert bench.run(["--case", "tiny", "--device", "cpu", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_list_names_the_issue_cases(capsys):
    assert bench.run(["--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "sd15-256-cpu" in names
    assert any(n.startswith("sd15-512-b1") for n in names) and any(n.startswith("sd15-512-b8") for n in names)
    assert any(n.startswith("sdxl-1024-b1") for n in names)


def test_mfu_uses_the_issue_flop_counts_and_shows_in_the_table():
    sd15 = bench.CASES["sd15-512-b8-bf16-adamw-cached"]
    sdxl = bench.CASES["sdxl-1024-b1-bf16-adamw8bit-gc-cached"]
    assert bench.unet_flop_per_sample(sd15) == 2.41e12
    assert bench.unet_flop_per_sample(sdxl) == 20.2e12
    assert bench.unet_flop_per_sample(bench.CASES["sd15-256-cpu"]) == pytest.approx(2.41e12 / 4)
    assert bench.unet_flop_per_sample(bench.CASES["tiny"]) is None
    # A GPU-shaped result (the GPU path cannot run here): 8 samples/s at 2.41 TFLOP against a 100 TFLOP/s peak.
    result = dict(steps_per_s=1.0, samples_per_s=8.0, peak_bytes=6 * 2**30, peak_kind="VRAM", mfu=8 * 2.41e12 / 1e14)
    table = bench.format_table([{"case": sd15.name, "ours": result, "reference": {"error": "not run"},
                                 "ratio": None}])
    ours_row = table.splitlines()[2]
    assert "| 19.3% |" in ours_row and "6.00 GiB VRAM" in ours_row
    assert "failed: not run" in table.splitlines()[3]


def test_full_size_architectures_have_the_published_parameter_counts():
    # Built on the meta device: shapes only, no memory, no arithmetic.
    def count(module):
        return sum(p.numel() for p in module.parameters())

    sd15 = bench.build_models("sd15", "meta")
    assert count(sd15.unet) == 859_520_964
    assert count(sd15.vae) == 83_653_863
    assert [count(t) for t in sd15.text_encoders] == [123_060_480]  # CLIP ViT-L/14 text tower
    sdxl = bench.build_models("sdxl", "meta")
    assert count(sdxl.unet) == 2_567_463_684
    assert [count(t) for t in sdxl.text_encoders] == [123_060_480, 694_659_840]  # CLIP-L and OpenCLIP bigG


def test_the_io_bench_builds_the_same_architectures():
    import io_bench

    from dreambooth.checkpoint.convert import meta_model

    def count(component, arch):
        family, configs = io_bench.MODELS[arch]
        return sum(p.numel() for p in meta_model(component, configs[component], family).parameters())

    assert count("unet", "sd15") == 859_520_964 and count("vae", "sd15") == 83_653_863
    assert count("unet", "sdxl") == 2_567_463_684 and count("text_encoder_2", "sdxl") == 694_659_840


def test_the_product_cli_has_no_bench_verb():
    from dreambooth.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench"])


@pytest.mark.slow
@pytest.mark.slow
def test_ops_and_profile_per_loop(tiny_run):
    """The CPU proxies of host work: aten ops counted per step, and a profile of two steps (host time, top ops)."""
    stdout, results = tiny_run
    (row,) = results["rows"]
    for loop in ("ours", "reference"):
        ops, prof = row[loop]["ops"], row[loop]["profile"]
        assert ops["total"] > 100 and ops["top"][0][1] > 1
        assert prof["steps"] == 2 and prof["cpu_ms_per_step"] > 0
        # the profiler also records the ops that composite ops call, so it counts at least what the dispatcher sees
        assert prof["aten_ops_per_step"] >= ops["total"]
        names = [name for name, _, _ in prof["top_cpu_ops"]]
        assert any(n in names for n in ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::addmm",
                                        "aten::mm", "aten::bmm")), names
        assert "kernel_launches_per_step" not in prof  # GPU figures only where a GPU ran
        assert f"profile tiny / {loop}: " in stdout
    assert "aten ops per step, tiny: ours " in stdout


def test_the_kernel_summary_reads_what_a_gpu_profile_holds():
    """The GPU half of --profile, on events shaped as torch.profiler averages them on a GPU: host launches (CPU
    events), kernels and copies (CUDA events); an aten op's own CUDA time is not counted twice."""
    from types import SimpleNamespace

    import torch

    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(key, count, device_type, us=0.0):
        return SimpleNamespace(key=key, count=count, device_type=device_type, self_device_time_total=us)

    table = [event("aten::mm", 20, cpu, 900.0), event("cudaLaunchKernel", 30, cpu), event("cuLaunchKernelEx", 10, cpu),
             event("sm90_xmma_gemm_bf16", 20, gpu, 900.0), event("cudnn::conv2d_fprop", 6, gpu, 300.0),
             event("Memcpy HtoD (Pageable -> Device)", 2, gpu, 20.0)]
    summary = bench.kernel_summary(table, steps=2)
    assert summary["kernel_launches_per_step"] == 20 and summary["kernel_ms_per_step"] == pytest.approx(0.61)
    assert [name for name, _, _ in summary["top_kernels"]][:2] == ["sm90_xmma_gemm_bf16", "cudnn::conv2d_fprop"]
    assert summary["top_kernels"][0][1:] == [10, pytest.approx(0.45)]
    shown = bench.format_profile("c", "ours", {"aten_ops_per_step": 10, "cpu_ms_per_step": 1.0, **summary})
    assert "20 kernel launches, 0.6 ms of kernels per step" in shown and "sm90_xmma_gemm_bf16" in shown


def test_ours_runs_frozen_text_encoders_once_per_prompt_as_the_trainer_does():
    """Frozen text encoders: the bench's loop, as the trainer's, encodes each prompt once (one at a time) and reuses
    the embeddings, where the reference precomputes them (SDXL) or runs the encoder every step."""
    import torch

    case = bench.Case("tiny-frozen", "tiny", 64, 2, "no", "adamw", True, False)
    models = bench.build_models("tiny", "cpu")
    calls = []
    for encoder in models.text_encoders:
        encoder.register_forward_hook(lambda *args: calls.append(1))
    run = bench.build_ours(case, models, bench.make_inputs(case, "cpu"), "cpu")
    losses = [run() for _ in range(3)]
    assert len(calls) == case.batch * len(models.text_encoders)  # the first step's, one prompt at a time
    assert all(torch.isfinite(loss) for loss in losses)


def test_lora_cases_run_both_loops_at_tiny_size(tmp_path):
    out = tmp_path / "lora.json"
    proc = run_script("--case", "tiny-lora", "--device", "cpu", "--steps", "2", "--warmup", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    for loop in ("ours", "reference"):
        assert row[loop]["steps"] == 2 and 0 < row[loop]["loss"] < 100
    table = [line for line in proc.stdout.splitlines() if line.startswith("| tiny-lora ")]
    assert len(table) == 2 and all("| LoRA r4 |" in line for line in table)
    assert {"sd15-512-b1-fp16-lora16-cached", "sdxl-1024-b1-bf16-lora16-gc-cached"} <= set(bench.DEFAULT_CASES["cuda"])


def measured(case: str) -> dict:
    """A (case, loop) result as train_bench's child process reports it."""
    return {"case": case, "steps_per_s": 2.0, "samples_per_s": 4.0, "peak_bytes": 2**30, "peak_kind": "RSS",
            "device": "CPU"}


def test_the_bench_writes_its_results_after_every_case(tmp_path, monkeypatch):
    """A bench stopped part way (killed at the end of its time on a GPU) leaves the cases it measured in its JSON."""
    out = tmp_path / "bench.json"
    calls = []

    def child(extra, timeout):
        case = extra[extra.index("--case") + 1]
        calls.append(case)
        if case == "tiny-lora":
            raise KeyboardInterrupt  # the process ends here, as when it is killed
        return measured(case)

    monkeypatch.setattr(bench, "_run_child", child)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--case", "tiny,tiny-lora", "--device", "cpu", "--json", str(out)])
    assert calls == ["tiny", "tiny", "tiny-lora"]
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["tiny"] and rows[0]["ratio"] == 1.0


def test_cases_that_differ_only_in_the_trainers_settings_share_one_reference_measurement(tmp_path, monkeypatch):
    """The reference ignores the trainer's settings and latent caching: measured once for the cases that share its
    setup (a GPU's minutes go to ours), shown as such in the table."""
    import dataclasses

    for name, changes in (("tiny-plain", dict(settings=(("fused_backward_step", False),))),
                          ("tiny-cached", dict(cache_latents=True)), ("tiny-b1", dict(batch=1))):
        monkeypatch.setitem(bench.CASES, name, dataclasses.replace(bench.CASES["tiny"], name=name, **changes))
    runs = []

    def child(extra, timeout):
        runs.append((extra[extra.index("--case") + 1], extra[1]))
        return measured(extra[extra.index("--case") + 1])

    monkeypatch.setattr(bench, "_run_child", child)
    out = tmp_path / "bench.json"
    assert bench.main(["--case", "tiny,tiny-plain,tiny-cached,tiny-b1", "--device", "cpu", "--json", str(out)]) == 0
    assert [case for case, loop in runs if loop == "reference"] == ["tiny", "tiny-b1"]
    assert [case for case, loop in runs if loop == "ours"] == ["tiny", "tiny-plain", "tiny-cached", "tiny-b1"]
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["tiny-plain"]["reference"]["shared_with"] == "tiny" and "shared_with" not in rows["tiny-b1"]["reference"]
    assert rows["tiny-cached"]["ratio"] == 1.0
    assert "| reference (as tiny) |" in bench.format_table(list(rows.values()))


def test_the_gpu_check_keeps_the_bench_cases_measured_when_its_time_runs_out(tmp_path, monkeypatch):
    import gpu_check

    def run(command, **kwargs):  # train_bench measured one case, then the job's time ran out
        assert kwargs["timeout"] < 300
        out = Path(command[command.index("--json") + 1])
        out.write_text(json.dumps({"rows": [{"case": "tiny", "ours": measured("tiny"),
                                             "reference": measured("tiny"), "ratio": 1.0}]}))
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    (tmp_path / "bench.json").write_text(json.dumps({"rows": [{"case": "stale"}]}))
    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    result = gpu_check.job_bench(tmp_path, dry=True, timeout=300)
    assert result["cut_short"] == "1 of 1 cases measured before the time ran out"
    assert "| tiny | tiny | 64 | 2 | no | adamw | full | encoded | trained | off | ours | 2 | 4 | 1.00 GiB RSS | - | 1.00x |" \
        in result["table"]

    def nothing(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    (tmp_path / "bench.json").write_text(json.dumps({"rows": [{"case": "stale"}]}))
    monkeypatch.setattr(gpu_check.subprocess, "run", nothing)
    with pytest.raises(RuntimeError, match="train_bench measured nothing before the time ran out"):
        gpu_check.job_bench(tmp_path, dry=True, timeout=300)


@pytest.mark.slow
def test_the_gpu_check_dry_run_runs_every_part_and_writes_the_table(tmp_path):
    """bench/gpu_check.py --dry-run: the GPU check's own code on tiny models on the CPU, so it cannot rot."""
    out = tmp_path / "check"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), str(out), "--dry-run",
                           "--budget", "1200"], cwd="/", env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    jobs = results["jobs"]
    assert list(jobs) == ["a-sd15", "b-sdxl-lora", "c-sd15-8gb", "c-sdxl-8gb", "d-bench", "e-plans"]
    assert all(job["status"] == "ok" for job in jobs.values()), jobs
    for name in ("a-sd15", "b-sdxl-lora"):
        flow = jobs[name]["result"]
        assert flow["class_images"] == 4 and flow["steady_it_s"] > 0
        assert all(flow[k] >= 0 for k in ("create_s", "class_images_s", "preview_s", "save_s", "export_s"))
        assert flow["plan_gib"] > 0
    preset = jobs["c-sd15-8gb"]["result"]
    assert preset["preset_gib"] == 8 and preset["settings"] and preset["plan_gib"] > 0
    assert "| ours |" in jobs["d-bench"]["result"]["table"]
    table = (out / "results.md").read_text()
    assert "| a-sd15 | ok |" in table and "dry run" in table
