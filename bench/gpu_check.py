"""One-shot GPU check: everything a short time on a GPU should measure, in one command, into one folder.

    python bench/gpu_check.py OUT [--parts a,b,c,d] [--budget SECONDS] [--dry-run]

(a) the default flow end to end on a full-size random SD1.5: create, class images (8), 100 steps, a preview, a save,
    the export; the time of each phase, steady it/s, peak VRAM and the memory plan beside it;
(b) the same for a full-size SDXL LoRA run at 1024 (class images 4, 30 steps);
(c) each VRAM preset (8, 12, 16, 24 GiB) of SD1.5 and SDXL for 5 steps: max_memory_allocated against the preset's size
    and the plan;
(d) bench/train_bench.py's main cases, ours against diffusers' loop, one process per case and loop.

Every job runs in its own process (its own peak memory); a job that would start after --budget seconds (default 450)
is listed as skipped. The memory plans (CPU work: a trace each) come last, several at once, so the GPU's time goes to
measuring first. OUT gets results.json, results.md (the table to paste) and the model folders under OUT/root.
`--dry-run` runs the same code on tiny models at 64 px on the CPU, in a few minutes: CI runs it so this file
cannot rot. The random source is built on the device (fast init there) and written once per family, in fp16.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

PRESET_SIZES = (8, 12, 16, 24)
# The product's defaults first, then the fastest settings at batch 1 and 8, channels-last, autotuned, SDXL, LoRA and,
# last, compiled (its compile takes the longest). Cases that differ only in the trainer's settings share one
# measurement of the reference.
BENCH_CASES = ["sd15-512-b1-fp16-adamw8bit-cached", "sd15-512-b1-bf16-adamw-cached", "sd15-512-b8-bf16-adamw-cached",
               "sd15-512-b8-bf16-adamw8bit-cached", "sd15-512-b8-bf16-adamw-cached-cl",
               "sd15-512-b8-bf16-adamw-cached-tuned", "sdxl-1024-b1-bf16-adamw8bit-gc-cached",
               "sd15-512-b1-fp16-lora16-cached", "sd15-512-b8-bf16-adamw-cached-compiled"]


def flows(dry: bool) -> dict:
    """(a) and (b): arch (full-size architecture of bench/architectures.py), family, resolution, steps, class images
    per instance image (4 instance images), settings beyond the defaults."""
    if dry:
        return {"a-sd15": dict(arch="sd15", family="v1", resolution=64, steps=4, per_image=1, settings={}),
                "b-sdxl-lora": dict(arch="sdxl", family="sdxl", resolution=64, steps=4, per_image=1,
                                    settings={"use_lora": True})}
    return {"a-sd15": dict(arch="sd15", family="v1", resolution=512, steps=100, per_image=2, settings={}),
            "b-sdxl-lora": dict(arch="sdxl", family="sdxl", resolution=1024, steps=30, per_image=1,
                                settings={"use_lora": True})}


def jobs(parts: str, dry: bool) -> list[tuple[str, list[str]]]:
    """(name, arguments of the job's process), in the order they run."""
    out = []
    if "a" in parts:
        out.append(("a-sd15", ["flow", "a-sd15"]))
    if "b" in parts:
        out.append(("b-sdxl-lora", ["flow", "b-sdxl-lora"]))
    if "c" in parts:
        for flow in ("a-sd15", "b-sdxl-lora"):
            for size in PRESET_SIZES[:1] if dry else PRESET_SIZES:
                out.append((f"c-{flow.split('-')[1]}-{size}gb", ["preset", flow, str(size)]))
    if "d" in parts:
        out.append(("d-bench", ["bench"]))
    if any(part in parts for part in "abc"):
        out.append(("e-plans", ["plans"]))  # CPU work, last: the GPU's time goes to measuring first
    return out


# ---------------------------------------------------------------------------------------------------------------
# Inside a job's process.

def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def component_configs(arch: str, family: str, dry: bool) -> dict:
    if dry:
        from dreambooth.checkpoint.tiny import tiny_configs

        return tiny_configs(family)
    from architectures import components

    return components(arch)


def write_source(folder: Path, arch: str, family: str, dry: bool) -> Path:
    """A random diffusers folder of the architecture, built on the device and saved in fp16 (half the bytes)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.checkpoint.convert import write_pipeline_files

    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    for name, config in component_configs(arch, family, dry).items():
        with torch.device(device()):
            if name == "unet":
                model = UNet2DConditionModel(**config)
            elif name == "vae":
                model = AutoencoderKL(**config)
            else:
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                model = cls(CLIPTextConfig(**config))
        model.half().save_pretrained(tmp / name, safe_serialization=True)
        del model
    write_pipeline_files(tmp, family)
    tmp.rename(folder)
    return folder


def ensure_model(root, name: str, flow: dict, dry: bool) -> dict:
    """Create model `name` from the random source (once) with 4 instance images; the time of each part."""
    from PIL import Image

    from dreambooth.config import Config
    from dreambooth.models import create_model

    times = {}
    model = root.model(name)
    if model.exists():
        return times
    started = time.perf_counter()
    source = write_source(root.root / "sources" / flow["arch"], flow["arch"], flow["family"], dry)
    times["source_s"] = time.perf_counter() - started
    started = time.perf_counter()
    create_model(root, name, str(source), family=flow["family"])
    times["create_s"] = time.perf_counter() - started
    images = root.root / "instance" / name
    images.mkdir(parents=True, exist_ok=True)
    side = flow["resolution"]
    for i in range(4):
        Image.effect_noise((side, side), 40 + 10 * i).convert("RGB").save(images / f"zwx dog {i}.png")
    data = Config.load(model.config_path).to_dict()
    data["concepts"] = [{"instance_data_dir": str(images), "instance_token": "zwx", "class_token": "dog",
                         "class_prompt": "a photo of a dog", "num_class_images_per_image": flow["per_image"],
                         "sample_prompt": "a photo of zwx dog", "num_samples": 1}]
    if dry:
        data["concepts"][0].update(class_infer_steps=2, sample_infer_steps=2)
    data["parameters"].update(resolution=side, **flow["settings"])
    Config.from_dict(data).save(model.config_path)
    return times


def phases(events: list[dict]) -> dict:
    """Phase times and steady it/s from a run's events (each carries its time)."""
    def first(kind):
        return next((e for e in events if e["kind"] == kind), None)

    steps = [e for e in events if e["kind"] == "step"]
    out = {}
    start, made = first("start"), [e for e in events if e["kind"] == "class_images"]
    if made and start:
        out["class_images"] = made[-1]["done"]
        out["class_images_s"] = start["time"] - made[0]["time"]
    if len(steps) >= 3:
        skip = min(10, len(steps) // 2)  # the first steps warm up (allocator, kernels)
        out["steady_it_s"] = (len(steps) - 1 - skip) / (steps[-1]["time"] - steps[skip]["time"])
    sample, saved = first("sample"), first("checkpoint")
    if sample and steps:
        out["preview_s"] = sample["time"] - steps[-1]["time"]
    if saved:
        out["save_s"] = saved["time"] - (sample or steps[-1])["time"]
    return out


def plan_gib(root, name: str, overrides: dict | None = None) -> float | str:
    from dataclasses import replace

    from dreambooth.config import Config
    from dreambooth.train.memory import plan_model

    try:
        params = Config.load(root.model(name).config_path).parameters
        return plan_model(root, name, replace(params, **(overrides or {}))).peak / 2**30
    except Exception as e:  # the plan is a figure beside the measurement: say why it is missing
        return f"plan failed: {type(e).__name__}: {str(e)[:100]}"


def train(root, name: str, steps: int, overrides: dict) -> tuple[dict, float | None]:
    import torch

    from dreambooth.train import train_model

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train_model(root, name, max_steps=steps, overrides=overrides)
    if not result.ok:
        raise RuntimeError(result.summary())
    model = root.model(name)
    events = [json.loads(line) for line in model.events.read_text().splitlines()]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return phases(events), peak


def job_flow(root, name: str, dry: bool) -> dict:
    from dreambooth.models import export_model

    flow = flows(dry)[name]
    out = ensure_model(root, name, flow, dry)
    epochs = max(1, flow["steps"] // 4)
    schedule = {"num_train_epochs": epochs, "sample_every_n_epochs": epochs, "save_every_n_epochs": 0}
    measured, peak = train(root, name, flow["steps"], schedule)
    out.update(measured, steps=flow["steps"], peak_gib=peak)
    started = time.perf_counter()
    export_model(root, name, half=True, out=root.checkpoints / f"{name}-export.safetensors")
    out["export_s"] = time.perf_counter() - started
    out.update(model=name, plan_overrides={})
    return out


def job_preset(root, flow_name: str, size: int, dry: bool) -> dict:
    from dreambooth.config import Config
    from dreambooth.train.memory import preset_for

    flow = flows(dry)[flow_name]
    ensure_model(root, flow_name, flow, dry)
    model = root.model(flow_name)
    for folder in (model.state, model.saves):  # a fresh run each time (the class images are reused)
        shutil.rmtree(folder, ignore_errors=True)
    family = Config.load(model.config_path).model.family
    preset_size, settings = preset_for(family, size, *_arch_and_params(model, family))
    overrides = {**settings, "use_lora": False, "save_on_end": False, "save_during_training": False,
                 "sample_every_n_epochs": 0}
    _, peak = train(root, flow_name, 2 if dry else 5, overrides)
    return {"preset_gib": preset_size, "settings": settings, "peak_gib": peak, "model": flow_name,
            "plan_overrides": overrides}


def _arch_and_params(model, family: str):
    from dreambooth.config import Config
    from dreambooth.train.memory import architecture_from_folder

    return (lambda: architecture_from_folder(model.working, family)), Config.load(model.config_path).parameters


def job_bench(out: Path, dry: bool, timeout: float) -> dict:
    """train_bench's cases within the job's time. It writes its JSON after every case, so when the time runs out
    the cases measured by then still come back (`cut_short` says how many)."""
    from train_bench import format_table

    cases = ["tiny"] if dry else BENCH_CASES
    how = ["--device", "cpu", "--steps", "2", "--warmup", "1"] if dry else ["--steps", "10", "--warmup", "3", "--profile"]
    written = out / "bench.json"
    written.unlink(missing_ok=True)  # an earlier run's
    command = [sys.executable, str(BENCH / "train_bench.py"), "--case", ",".join(cases), *how, "--json", str(written),
               "--timeout", str(max(30, int(timeout)))]
    try:  # a little before the job's own end, to read what was measured
        proc = subprocess.run(command, capture_output=True, text=True, timeout=max(20, timeout - 20))
    except subprocess.TimeoutExpired:
        proc = None
    rows = json.loads(written.read_text())["rows"] if written.is_file() else []
    if not rows:
        error = "train_bench measured nothing before the time ran out" if proc is None else \
            (proc.stderr.strip().splitlines() or ["train_bench failed"])[-1]
        raise RuntimeError(error)
    result = {"table": format_table(rows), "rows": rows}
    if proc is None:
        result["cut_short"] = f"{len(rows)} of {len(cases)} cases measured before the time ran out"
    return result


def job_plans(out: Path, root) -> dict:
    """The memory plan beside each measured job, several at once (each traces on one CPU core)."""
    from concurrent.futures import ProcessPoolExecutor

    measured = {}
    for path in sorted((out / "jobs").glob("*.json")):
        data = json.loads(path.read_text())
        if "plan_overrides" in data:
            measured[path.stem] = (data["model"], data["plan_overrides"])
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread) as pool:
        futures = {stem: pool.submit(plan_gib, root, model, overrides)
                   for stem, (model, overrides) in measured.items()}
        return {stem: future.result() for stem, future in futures.items()}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_job(out: Path, kind: str, rest: list[str], dry: bool, timeout: float) -> int:
    import warnings

    from dreambooth.store import DataRoot, atomic_write_text

    warnings.simplefilter("ignore")
    root = DataRoot(out / "root").ensure()
    if kind == "flow":
        result = job_flow(root, rest[0], dry)
    elif kind == "preset":
        result = job_preset(root, rest[0], int(rest[1]), dry)
    elif kind == "plans":
        result = job_plans(out, root)
    else:
        result = job_bench(out, dry, timeout)
    atomic_write_text(out / "jobs" / f"{job_stem([kind, *rest])}.json",
                      json.dumps(result, indent=2, default=str) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The parent: the jobs one after another within the budget, then the table.

def fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict) -> str:
    lines = [f"{results['date']}, {results['device']}, {'dry run (tiny, CPU)' if results['dry_run'] else 'full size'}",
             "", "| job | status | phases (s) | steady it/s | peak GiB | plan GiB | preset GiB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["jobs"].items():
        data = r.get("result", {})
        keys = ("source_s", "create_s", "class_images_s", "preview_s", "save_s", "export_s")
        times = ", ".join(f"{k[:-2]} {data[k]:.1f}" for k in keys if isinstance(data.get(k), (int, float)))
        lines.append(f"| {name} | {r['status']} | {times or '-'} | {fmt(data.get('steady_it_s'))} | "
                     f"{fmt(data.get('peak_gib'))} | {fmt(data.get('plan_gib'))} | {fmt(data.get('preset_gib'))} |")
    bench = results["jobs"].get("d-bench", {}).get("result", {})
    if bench.get("table"):
        lines += ["", bench["table"]] + ([f"(cut short: {bench['cut_short']})"] if bench.get("cut_short") else [])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for results.json, results.md and the models")
    p.add_argument("--parts", default="abcd", help="which parts to run (default abcd)")
    p.add_argument("--budget", type=float, default=450, help="seconds; later jobs are skipped (default 450)")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: the same code, in minutes")
    p.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = args.out.resolve()
    if args.job:
        return run_job(out, args.job[0], args.job[1:], args.dry_run, args.budget)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(BENCH.parent))
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU's, even on a GPU machine
    started = time.monotonic()
    results = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "dry_run": args.dry_run, "jobs": {}}
    for name, job in jobs(args.parts, args.dry_run):
        left = args.budget - (time.monotonic() - started)
        if left < 20:
            results["jobs"][name] = {"status": "skipped (time)"}
            continue
        print(f"gpu_check: {name} ({left:.0f} s left)", file=sys.stderr, flush=True)
        begun = time.monotonic()
        command = [sys.executable, __file__, str(out), "--job", *job, "--budget", str(int(left))]
        command += ["--dry-run"] if args.dry_run else []
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=left, env=env)
            ok = proc.returncode == 0
            error = "" if ok else (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
        except subprocess.TimeoutExpired:
            ok, error = False, "timed out"
        record = {"status": "ok" if ok else f"failed: {error}", "seconds": round(time.monotonic() - begun, 1)}
        if ok:
            record["result"] = json.loads((out / "jobs" / f"{job_stem(job)}.json").read_text())
        results["jobs"][name] = record
    plans = results["jobs"].get("e-plans", {}).get("result", {})
    for name, job in jobs(args.parts, args.dry_run):
        if job_stem(job) in plans and "result" in results["jobs"][name]:
            results["jobs"][name]["result"]["plan_gib"] = plans[job_stem(job)]
    results["device"] = _device_name(env)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if all(r["status"] == "ok" for r in results["jobs"].values()) else 1


def job_stem(job: list[str]) -> str:
    """The name of a job's result file."""
    return job[1] if job[0] == "flow" else "-".join(job)


def _device_name(env) -> str:
    code = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return proc.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
