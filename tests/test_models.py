"""The model manager on real tiny models: idle unload, warm-up, replicas, ZeroGPU, captioner placement."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from kit import zerogpu
from kit.generate import GenerationJob, GenerationRequest, run_pipeline
from kit.memory import Strategy
from kit.models import ModelManager, release_cached_memory
from kit.services import build_services
from kit.warmup import warm_up, warm_up_in_background
from tests.conftest import demo_preset

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def tiny_preset(**overrides):
    """Return the demo preset running the tiny random-weight models that the tests build."""
    generator = {"model": "builtin:tiny-sd", **overrides.pop("generator", {})}
    describe = {"model": "builtin:tiny-blip", **overrides.pop("describe", {})}
    return demo_preset(generator=generator, describe=describe, **overrides)


def request(**changes) -> GenerationRequest:
    values = dict(prompt="a red circle", seed=7, steps=2, guidance_scale=5.0, width=64, height=64, num_images=1)
    values.update(changes)
    return GenerationRequest(**values)


def progress_kinds(job: GenerationJob) -> list[str]:
    kinds = [update.kind for update in job.progress(poll_seconds=0.05) if update is not None]
    job.wait(60)
    return kinds


def rss_bytes() -> int:
    """Resident memory of this process: the second field of /proc/self/statm, in pages."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def build_large_sd(tiny_sd: Path, target: Path) -> int:
    """Copy the tiny SD pipeline with a UNet of about 240 MiB; return the UNet's weight bytes."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(tiny_sd, target)
    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        block_out_channels=(128, 256, 384),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,  # the tiny text encoder's width
        norm_num_groups=32,
    ).eval()
    shutil.rmtree(target / "unet")
    unet.save_pretrained(target / "unet")
    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    del unet
    return weight_bytes


# -- idle unload --------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_idle_unload_returns_memory(make_services, data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kit.models")
    large = tmp_path / "large-sd"
    unet_bytes = build_large_sd(data_dir / "models" / "tiny-sd", large)
    assert unet_bytes > 200 * MIB

    # Import and run every code path once on the tiny models, so the baseline already
    # contains the imported modules and one-time caches, not weights.
    tiny = make_services(tiny_preset())
    tiny.generator.generate(request(), owner="browser:warm")
    tiny.describer.describe(Image.new("RGB", (64, 64), "red"))
    tiny.close()
    release_cached_memory()
    before = rss_bytes()

    preset = tiny_preset(generator={"model": str(large)}, memory={"idle_unload_seconds": 2})
    services = make_services(preset)
    services.generator.generate(request(), owner="browser:x")
    services.describer.describe(Image.new("RGB", (64, 64), "blue"))
    loaded = rss_bytes()

    services.models.start(poll_seconds=0.1)
    replica = services.models.replicas[0]
    deadline = time.monotonic() + 30
    # The watcher keeps the replica busy until the unload has released the memory.
    while (services.models.is_loaded() or replica.busy) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not services.models.is_loaded()
    after = rss_bytes()

    print(f"RSS before load {before / MIB:.0f} MiB, loaded {loaded / MIB:.0f} MiB, after unload {after / MIB:.0f} MiB")
    assert loaded - before > 0.8 * unet_bytes  # the measurement includes the weights
    assert after <= before * 1.10

    load_line = re.compile(r"loaded generator .*large-sd on cpu in \d+\.\d\d s: (\d+\.\d) MiB of weights")
    unload_line = re.compile(r"unloaded models from cpu \(idle for \d+ s\) in \d+\.\d\d s: (\d+\.\d) MiB of weights released")
    loads = [load_line.search(record.getMessage()) for record in caplog.records]
    unloads = [unload_line.search(record.getMessage()) for record in caplog.records]
    assert float(next(m for m in loads if m).group(1)) * MIB >= unet_bytes
    assert float(next(m for m in unloads if m).group(1)) * MIB >= unet_bytes

    # The next job reloads the models and reports a loading update.
    job = services.generator.start(request(seed=8), owner="browser:x")
    assert "loading" in progress_kinds(job)
    assert len(job.result.images) == 1
    assert services.models.is_loaded()


def test_unload_idle_uses_clock(data_dir):
    now = {"value": 1000.0}
    manager = ModelManager(tiny_preset(memory={"idle_unload_seconds": 60}), data_dir, devices=["cpu"], clock=lambda: now["value"])
    with manager.acquire():
        pass
    assert manager.unload_idle() == 0
    now["value"] += 59
    assert manager.unload_idle() == 0
    now["value"] += 2
    assert manager.unload_idle() == 1
    assert not manager.is_loaded()


# -- warm-up ------------------------------------------------------------------------------------


def test_warm_up_loads_and_saves_nothing(make_services):
    services = make_services(tiny_preset())
    seconds = warm_up(services)
    assert seconds > 0
    replica = services.models.replicas[0]
    assert replica.generator_loaded
    assert replica.captioner is not None
    assert services.gallery.count() == 0

    job = services.generator.start(request(), owner="browser:x")
    kinds = progress_kinds(job)
    assert "loading" not in kinds
    assert "step" in kinds
    assert services.gallery.count() == 1


def test_warm_up_in_background_covers_every_replica(data_dir):
    services = build_services(tiny_preset(), data_dir, devices=["cpu", "cpu"])
    try:
        warm_up_in_background(services).join(120)
        assert all(r.generator_loaded and r.captioner is not None for r in services.models.replicas)
    finally:
        services.close()


def test_warm_up_with_describe_only(make_services):
    services = make_services(tiny_preset(features={"generator": False}))
    warm_up(services)
    replica = services.models.replicas[0]
    assert replica.captioner is not None
    assert not replica.generator_loaded


# -- several replicas ---------------------------------------------------------------------------


def test_two_replicas_run_two_jobs_at_once(data_dir):
    # One job per pipeline call, so that three jobs need three calls.
    services = build_services(tiny_preset(queue={"max_batch_size": 1}), data_dir, devices=["cpu", "cpu"])
    try:
        assert services.models.replica_count == 2
        services.models.preload()
        unets = [r.pipelines["text2image"].unet for r in services.models.replicas]
        assert unets[0] is not unets[1]

        lock = threading.Lock()
        state = {"inside": 0, "max": 0}
        used: set[int] = set()
        release = threading.Event()

        def enter(module, args):
            with lock:
                state["inside"] += 1
                state["max"] = max(state["max"], state["inside"])
                used.add(id(module))
            release.wait(60)

        def leave(module, args, output):
            with lock:
                state["inside"] -= 1

        handles = [h for unet in unets for h in (unet.register_forward_pre_hook(enter), unet.register_forward_hook(leave))]
        try:
            jobs = [services.generator.start(request(seed=i), owner="browser:x") for i in range(3)]
            deadline = time.monotonic() + 60
            while state["inside"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert state["inside"] == 2
            time.sleep(0.3)  # room for a third job to start, if the manager let it
            waiting = [job for job in jobs if all(u.kind == "waiting" for u in list(job.updates.queue))]
            assert len(waiting) == 1
            assert state["max"] == 2
            release.set()
            for job in jobs:
                job.wait(120)
        finally:
            release.set()
            for handle in handles:
                handle.remove()
        assert state["max"] == 2
        assert used == {id(unet) for unet in unets}
    finally:
        services.close()


@pytest.mark.parametrize(
    ("devices", "expected"),
    [("auto", 1), ("cpu", 1), (["cuda:0", "cuda:1"], 2), (["cuda:0", "cuda:1", "cuda:2"], 3)],
)
def test_replica_count_without_cuda(data_dir, devices, expected):
    manager = ModelManager(tiny_preset(memory={"devices": devices}), data_dir)
    assert manager.replica_count == expected
    assert not torch.cuda.is_initialized()


def test_replica_count_all_devices(data_dir):
    manager = ModelManager(tiny_preset(memory={"devices": "all"}), data_dir)
    assert manager.replica_count == max(1, torch.cuda.device_count())
    assert manager.replica_count == len(manager.replicas)
    assert not torch.cuda.is_initialized()


# -- Hugging Face ZeroGPU -----------------------------------------------------------------------

FAKE_SPACES = '''
"""Stand-in for Hugging Face's spaces package: records each spaces.GPU duration and call."""
durations = []
calls = []


def GPU(task=None, *, duration=None):
    def decorate(fn):
        durations.append(duration)

        def run(*args, **kwargs):
            calls.append(duration)
            return fn(*args, **kwargs)

        return run

    return decorate if task is None else decorate(task)
'''


@pytest.fixture
def fake_spaces(tmp_path, monkeypatch):
    folder = tmp_path / "fake-spaces"
    (folder / "spaces").mkdir(parents=True)
    (folder / "spaces" / "__init__.py").write_text(FAKE_SPACES, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.delenv("KIT_ZEROGPU_MAX_DURATION", raising=False)
    yield folder
    sys.modules.pop("spaces", None)


def test_estimate_duration_grows_with_job():
    small = zerogpu.estimate_duration("sdxl", 4, 512, 512, 1)
    assert small == 16  # 0.3 s x 4 steps x 0.26 MP + 15 s, rounded up
    assert zerogpu.estimate_duration("sdxl", 40, 512, 512, 1) == 19
    assert zerogpu.estimate_duration("sdxl", 4, 2048, 2048, 1) == 21
    assert zerogpu.estimate_duration("sdxl", 4, 512, 512, 16) == 21
    assert zerogpu.estimate_duration("flux", 4, 512, 512, 1) == 17
    assert zerogpu.estimate_duration("unknown", 4, 512, 512, 1) == small


def test_estimate_duration_is_capped(monkeypatch):
    monkeypatch.delenv("KIT_ZEROGPU_MAX_DURATION", raising=False)
    assert zerogpu.estimate_duration("flux", 60, 1536, 1024, 2) == 120
    monkeypatch.setenv("KIT_ZEROGPU_MAX_DURATION", "300")
    assert zerogpu.estimate_duration("flux", 60, 1536, 1024, 2) == 204  # 1.0 x 60 x 1.57 x 2 + 15
    monkeypatch.setenv("KIT_ZEROGPU_MAX_DURATION", "20")
    assert zerogpu.estimate_duration("sdxl", 30, 1024, 1024, 1) == 20
    monkeypatch.setenv("KIT_ZEROGPU_MAX_DURATION", "soon")
    assert zerogpu.max_duration() == 120
    monkeypatch.setenv("KIT_ZEROGPU_MAX_DURATION", "0")
    assert zerogpu.max_duration() == 120
    with pytest.raises(ValueError, match="must be positive"):
        zerogpu.estimate_duration("sd", 0, 512, 512, 1)


def test_gpu_call_is_plain_off_zerogpu(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def work():
        return 5

    assert zerogpu.gpu_call(work, 60) is work
    assert not zerogpu.is_active()


def test_zerogpu_inactive_without_spaces_package(monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "fake-spaces" not in p])
    assert not zerogpu.is_active()


def test_zerogpu_runs_job_inside_spaces_gpu(fake_spaces, make_services):
    services = make_services(tiny_preset())
    assert services.models.zerogpu
    import spaces

    job = GenerationJob(request(steps=3, num_images=2), owner="browser:x")
    with services.models.acquire() as replica:
        result = services.models.run_on_gpu(
            lambda: run_pipeline([job], replica, services.preset, services.models.family),
            steps=3,
            width=64,
            height=64,
            num_images=2,
        )
    assert len(result[0].images) == 2
    assert spaces.calls == [zerogpu.estimate_duration("sd", 3, 64, 64, 2)]

    assert services.models.run_on_gpu(lambda: "caption", duration_s=500) == "caption"
    assert spaces.calls[-1] == 120
    with pytest.raises(ValueError, match="steps, width and height, or duration_s"):
        services.models.run_on_gpu(lambda: None)


def test_zerogpu_duration_cap_from_environment(fake_spaces, data_dir, monkeypatch):
    monkeypatch.setenv("KIT_ZEROGPU_MAX_DURATION", "40")
    manager = ModelManager(tiny_preset(), data_dir, devices=["cpu"])
    manager.run_on_gpu(lambda: None, steps=200, width=512, height=512, num_images=4)
    import spaces

    assert spaces.calls == [40]


BUILD_SITE = """
import json, os, sys
import torch

lazy_inits = []
original = torch.cuda._lazy_init
def record():
    lazy_inits.append(1)
    return original()
torch.cuda._lazy_init = record

import app
report = {}
demo, services = app.create_site("sdxl", sys.argv[1])
report["plain"] = [torch.cuda.is_initialized(), len(lazy_inits), services.models.zerogpu]
os.environ["SPACES_ZERO_GPU"] = "true"
sys.path.insert(0, sys.argv[2])
demo, services = app.create_site("sdxl", sys.argv[1])
report["zerogpu"] = [torch.cuda.is_initialized(), len(lazy_inits), services.models.zerogpu, "spaces" in sys.modules]
print(json.dumps(report))
"""


def test_building_site_leaves_cuda_uninitialised(fake_spaces, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPACES_ZERO_GPU"}
    env["PYTHONPATH"] = str(ROOT)
    output = subprocess.run(
        [sys.executable, "-c", BUILD_SITE, str(tmp_path / "data"), str(fake_spaces)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert output.returncode == 0, output.stderr[-3000:]
    report = json.loads(output.stdout.strip().splitlines()[-1])
    assert report["plain"] == [False, 0, False]
    assert report["zerogpu"] == [False, 0, True, True]


# -- captioner sizing and placement -------------------------------------------------------------


def test_plan_counts_builtin_captioner(make_services):
    services = make_services(tiny_preset())
    services.generator.generate(request())
    plan = services.models.replicas[0].plan
    assert plan.captioner_placement == "cpu"
    assert sum(size.bytes for size in plan.captioner_components) > 100_000  # tiny BLIP: about 230 KB


def test_plan_without_describe_has_no_captioner(make_services):
    services = make_services(tiny_preset(features={"describe": False}))
    services.generator.generate(request())
    plan = services.models.replicas[0].plan
    assert plan.captioner_components == ()
    assert plan.captioner_placement == "none"


def test_unknown_describe_model_does_not_block_generation(make_services, caplog):
    caplog.set_level(logging.WARNING, logger="kit.models")
    services = make_services(tiny_preset(describe={"model": "example-org/uncached-captioner"}))
    result = services.generator.generate(request())
    assert len(result.images) == 1
    assert "could not size describe model example-org/uncached-captioner" in caplog.text


def test_offload_plan_moves_models_around_describe(make_services, caplog):
    services = make_services(tiny_preset())
    services.generator.generate(request())
    services.describer.describe(Image.new("RGB", (64, 64), "red"))
    replica = services.models.replicas[0]
    # CPU plans never offload, so give this replica the plan a small GPU would get.
    replica.plan = replace(replica.plan, strategy=Strategy.GPU, captioner_placement="offload", captioner_on_gpu=False)

    caplog.clear()
    caplog.set_level(logging.INFO, logger="kit.models")
    caption = services.describer.describe(Image.new("RGB", (64, 64), "blue"))
    moves = [re.sub(r" in .*", "", r.getMessage()) for r in caplog.records if r.getMessage().startswith("moved")]
    assert isinstance(caption, str)
    assert moves == ["moved generator to cpu", "moved captioner to cpu", "moved captioner to cpu", "moved generator to cpu"]
    assert not replica.busy

    caplog.clear()
    assert len(services.generator.generate(request()).images) == 1
    assert not [r for r in caplog.records if r.getMessage().startswith("moved")]


def test_gpu_placement_plan_moves_nothing_for_describe(make_services, caplog):
    services = make_services(tiny_preset())
    services.generator.generate(request())
    replica = services.models.replicas[0]
    replica.plan = replace(replica.plan, strategy=Strategy.GPU, captioner_placement="gpu", captioner_on_gpu=True)
    caplog.set_level(logging.INFO, logger="kit.models")
    services.describer.describe(Image.new("RGB", (64, 64), "red"))
    assert not [r for r in caplog.records if r.getMessage().startswith("moved")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_gpu_check_without_cuda_writes_nothing(tmp_path, capsys):
    from bench.gpu_check import main

    out = tmp_path / "benchmarks.md"
    assert main(["--out", str(out)]) == 0
    assert "CUDA is not available" in capsys.readouterr().out
    assert not out.exists()
