"""Memory planner: parameter counts of the real architectures, strategy choice, CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kit.families import FAMILIES
from kit.memory import (
    GIB,
    ComponentSize,
    Strategy,
    component_sizes,
    cuda_free_bytes,
    pick_dtype,
    plan_placement,
    working_memory_bytes,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_TURBO = "stabilityai/sdxl-turbo"
SD_TURBO = "stabilityai/sd-turbo"
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
BLIP_LARGE = "Salesforce/blip-image-captioning-large"

# Published parameter counts: (model id, component name, parameters).
KNOWN_PARAMETER_COUNTS = [
    (SDXL, "unet", 2_567_000_000),
    (SDXL, "vae", 83_700_000),
    (SDXL, "text_encoder", 123_000_000),
    (SDXL, "text_encoder_2", 695_000_000),
    (SD_TURBO, "unet", 865_900_000),
    (SD_TURBO, "text_encoder", 340_000_000),
    (SD_TURBO, "vae", 83_700_000),
    (FP16_FIX_VAE, "AutoencoderKL", 83_700_000),
    (BLIP_LARGE, "BlipForConditionalGeneration", 470_000_000),
]

# (model id, family, width, height, guidance) of each shipped hub preset at its defaults.
GENERATORS = {
    "sdxl": (SDXL, "sdxl", 1024, 1024, True),
    "sdxl-turbo": (SDXL_TURBO, "sdxl", 512, 512, False),
    "sd-turbo": (SD_TURBO, "sd2", 512, 512, False),
}

STRATEGY_ORDER = [Strategy.GPU, Strategy.MODEL_OFFLOAD, Strategy.SEQUENTIAL_OFFLOAD, Strategy.CPU]


@pytest.fixture(scope="module")
def meta_sizes() -> dict[str, list[ComponentSize]]:
    from kit.architectures import meta_component_sizes

    model_ids = [SDXL, SDXL_TURBO, SD_TURBO, FP16_FIX_VAE, BLIP_LARGE]
    return {model_id: meta_component_sizes(model_id, 2) for model_id in model_ids}


def plan_for(meta_sizes, name: str, free_gib: float | None, **overrides):
    model_id, family, width, height, guidance = GENERATORS[name]
    arguments = {
        "family": FAMILIES[family],
        "width": width,
        "height": height,
        "num_images": 1,
        "guidance": guidance,
        "device": "cuda",
        "free_bytes": None if free_gib is None else int(free_gib * GIB),
        "dtype": "float16",
        "vae_tiling_pixels": 1536 * 1536,
        "vae_fp16_fix": family == "sdxl",
    }
    arguments.update(overrides)
    return plan_placement(meta_sizes[model_id], meta_sizes[BLIP_LARGE], **arguments)


@pytest.mark.parametrize(("model_id", "component", "expected"), KNOWN_PARAMETER_COUNTS)
def test_parameter_count_matches_published(meta_sizes, model_id, component, expected):
    counted = {size.name: size.parameters for size in meta_sizes[model_id]}

    assert component in counted, f"{component} missing from {sorted(counted)}"
    assert abs(counted[component] - expected) <= 0.02 * expected, f"{component}: {counted[component]:,}"


def test_sdxl_turbo_shares_sdxl_architecture(meta_sizes):
    assert meta_sizes[SDXL_TURBO] == meta_sizes[SDXL]


def test_meta_sizes_count_bytes_per_dtype(meta_sizes):
    unet = next(size for size in meta_sizes[SDXL] if size.name == "unet")

    assert unet.bytes == unet.parameters * 2 + unet.buffer_bytes
    assert unet.at_dtype(4).bytes == unet.parameters * 4 + unet.buffer_bytes
    assert 0 < unet.largest_layer_parameters < unet.parameters


def test_sdxl_with_captioner_on_24_gib(meta_sizes):
    plan = plan_for(meta_sizes, "sdxl", 24)

    assert plan.strategy is Strategy.GPU
    assert plan.captioner_on_gpu
    assert not plan.vae_tiling
    assert plan.peak_bytes <= plan.budget_bytes


def test_sdxl_on_8_gib_offloads(meta_sizes):
    plan = plan_for(meta_sizes, "sdxl", 8)

    assert plan.strategy in (Strategy.MODEL_OFFLOAD, Strategy.SEQUENTIAL_OFFLOAD)
    assert plan.peak_bytes <= plan.budget_bytes
    assert any("all on GPU" in reason and "does not fit" in reason for reason in plan.reasons)


def test_sd_turbo_on_8_gib_stays_on_gpu(meta_sizes):
    plan = plan_for(meta_sizes, "sd-turbo", 8)

    assert plan.strategy is Strategy.GPU
    assert plan.captioner_on_gpu


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_80_gib_keeps_everything_on_gpu(meta_sizes, name):
    plan = plan_for(meta_sizes, name, 80)

    assert plan.strategy is Strategy.GPU
    assert plan.captioner_placement == "gpu"
    assert plan.free_bytes == 80 * GIB


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_more_memory_never_picks_slower_strategy(meta_sizes, name):
    plans = [plan_for(meta_sizes, name, gib) for gib in (8, 12, 24, 80)]
    ranks = [STRATEGY_ORDER.index(plan.strategy) for plan in plans]

    assert ranks == sorted(ranks, reverse=True), [plan.strategy.value for plan in plans]
    for plan in plans:
        assert plan.peak_bytes <= plan.budget_bytes, plan.summary()


def test_small_gpu_swaps_captioner(meta_sizes):
    # 4.5 GiB free leaves room for SD-Turbo all on GPU (3.4 GiB) or for BLIP-large, not both.
    plan = plan_for(meta_sizes, "sd-turbo", 4.5)

    assert plan.strategy is Strategy.GPU
    assert plan.captioner_placement == "offload"
    assert not plan.captioner_on_gpu


def test_nothing_fits_falls_back_to_sequential(meta_sizes):
    plan = plan_for(meta_sizes, "sdxl", 1)

    assert plan.strategy is Strategy.SEQUENTIAL_OFFLOAD
    assert plan.vae_tiling
    assert any("may run out of memory" in reason for reason in plan.reasons)


@pytest.mark.parametrize("forced", ["gpu", "model_offload", "sequential_offload"])
def test_forced_strategy_is_honoured(meta_sizes, forced):
    plan = plan_for(meta_sizes, "sd-turbo", 80, forced=forced)

    assert plan.strategy is Strategy(forced)
    assert any("forces" in reason for reason in plan.reasons)


def test_forced_gpu_that_does_not_fit_warns(meta_sizes):
    plan = plan_for(meta_sizes, "sdxl", 8, forced="gpu")

    assert plan.strategy is Strategy.GPU
    assert plan.vae_tiling
    assert any("may run out of memory" in reason for reason in plan.reasons)


def test_forced_cpu_runs_in_float32(meta_sizes):
    plan = plan_for(meta_sizes, "sdxl", 80, forced="cpu")

    assert plan.strategy is Strategy.CPU
    assert plan.dtype == "float32"


def test_cpu_device_plans_cpu(meta_sizes):
    plan = plan_for(meta_sizes, "sdxl", None, device="cpu")

    assert plan.strategy is Strategy.CPU
    assert plan.device == "cpu"
    assert plan.dtype == "float32"
    assert plan.free_bytes is None
    assert plan.captioner_placement == "cpu"
    unet = next(size for size in plan.components if size.name == "unet")
    assert unet.bytes == unet.parameters * 4 + unet.buffer_bytes


def test_unknown_free_memory_plans_cpu(meta_sizes):
    plan = plan_for(meta_sizes, "sd-turbo", None)

    assert plan.strategy is Strategy.CPU


def test_tiling_on_for_2048_request(meta_sizes):
    plan = plan_for(meta_sizes, "sdxl", 24, width=2048, height=2048)

    assert plan.vae_tiling
    assert any("vae_tiling_pixels" in reason for reason in plan.reasons)


def test_tiling_on_when_decode_does_not_fit(meta_sizes):
    # 1024x1024 is under the pixel threshold, but 8.6 GiB leaves no room for a full decode.
    plan = plan_for(meta_sizes, "sdxl", 8.6)

    assert plan.strategy is Strategy.GPU
    assert plan.vae_tiling
    assert any("full-size VAE decode would not fit" in reason for reason in plan.reasons)


def test_slicing_on_for_batches(meta_sizes):
    single = plan_for(meta_sizes, "sdxl", 24)
    batch = plan_for(meta_sizes, "sdxl", 24, num_images=2)

    assert not single.vae_slicing
    assert batch.vae_slicing
    assert batch.vae_decode_bytes == single.vae_decode_bytes


def test_stock_sdxl_vae_runs_in_float32(meta_sizes):
    stock = plan_for(meta_sizes, "sdxl", 24, vae_fp16_fix=False)
    fixed = plan_for(meta_sizes, "sdxl", 24, vae_fp16_fix=True)
    bfloat = plan_for(meta_sizes, "sdxl", 24, vae_fp16_fix=False, dtype="bfloat16")

    assert stock.vae_dtype == "float32"
    assert fixed.vae_dtype == "float16"
    assert bfloat.vae_dtype == "bfloat16"
    assert stock.vae_decode_bytes == 2 * fixed.vae_decode_bytes


def test_invalid_arguments_raise(meta_sizes):
    with pytest.raises(ValueError, match="pick_dtype"):
        plan_for(meta_sizes, "sdxl", 24, dtype="auto")
    with pytest.raises(ValueError, match="forced strategy"):
        plan_for(meta_sizes, "sdxl", 24, forced="fastest")


def test_working_memory_scales_with_request():
    family = FAMILIES["sdxl"]
    plain = working_memory_bytes(family, 1024, 1024, 1, 2, guidance=False)
    guided = working_memory_bytes(family, 1024, 1024, 1, 2, guidance=True)
    tiled = working_memory_bytes(family, 1024, 1024, 1, 2, guidance=False, vae_tiling=True)

    assert guided["denoise"] == 2 * plain["denoise"]
    assert guided["vae_decode"] == plain["vae_decode"]
    assert tiled["vae_decode"] < plain["vae_decode"] / 2
    assert plain["vae_decode"] > plain["denoise"]


def test_summary_and_one_line(meta_sizes):
    plan = plan_for(meta_sizes, "sdxl", 8)
    summary = plan.summary()

    assert plan.strategy.value in summary
    assert "unet" in summary
    assert "8.0 GiB free" in summary
    assert "\n" not in plan.one_line()
    assert "GiB" in plan.one_line()


def test_component_sizes_of_tiny_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from kit.tiny import ensure_tiny_model

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("tiny-sd", tmp_path))
    sizes = {size.name: size for size in component_sizes(pipe, None)}

    assert set(sizes) == {"unet", "vae", "text_encoder"}
    assert sizes["unet"].parameters == sum(p.numel() for p in pipe.unet.parameters())
    assert sizes["unet"].bytes == 4 * sizes["unet"].parameters  # float32, no buffers


def test_pick_dtype_on_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="kit.memory"):
        assert pick_dtype("cpu", "float16") == "float32"
    assert "float16" in caplog.text
    assert pick_dtype("cpu", "auto") == "float32"


def test_pick_dtype_keeps_gpu_request():
    assert pick_dtype("cuda", "bfloat16") == "bfloat16"
    assert pick_dtype("cuda", "float32") == "float32"
    with pytest.raises(ValueError, match="float64"):
        pick_dtype("cuda", "float64")


def test_cuda_free_bytes_without_gpu():
    import torch

    assert cuda_free_bytes("cpu") is None
    if not torch.cuda.is_available():
        assert cuda_free_bytes("cuda") is None


def _run_kit(*arguments: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_memory_module_does_not_import_torch():
    result = _run_kit("-c", "import sys, kit.memory; print('torch' in sys.modules)")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_cli_plan_sdxl_on_8_gib():
    result = _run_kit("-m", "kit", "plan", "--preset", "sdxl", "--gpu-memory", "8")

    assert result.returncode == 0, result.stderr
    assert "Strategy: model_offload" in result.stdout
    assert "8.0 GiB free" in result.stdout


def test_cli_all_table(capsys):
    from kit.plan_cli import main
    from kit.presets import preset_names

    assert main(["--all"]) == 0
    table = capsys.readouterr().out.splitlines()

    assert table[0].startswith("| preset | GPU memory")
    assert len(table) == 2 + 4 * len(preset_names())
    assert "| sdxl | 80 GiB | gpu |" in "\n".join(table)
