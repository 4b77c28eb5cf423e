"""Start a Microsite Kit site: ``python app.py --preset demo``.

Importing this module builds nothing. ``app.demo`` builds the Blocks from the environment
(``KIT_PRESET``, ``KIT_DATA_DIR``) on first access, for Hugging Face Spaces, ``gradio app.py``
and tests; the server starts only under ``__main__``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("kit.app")

DEFAULT_PORT = 7860
GPU_PRESET = "sdxl-turbo"
CPU_PRESET = "demo"


def default_data_dir() -> Path:
    if os.environ.get("KIT_DATA_DIR"):
        return Path(os.environ["KIT_DATA_DIR"])
    # Hugging Face Spaces mount persistent storage at /data.
    if os.environ.get("SPACE_ID") and os.access("/data", os.W_OK):
        return Path("/data")
    return Path("data")


def choose_preset(requested: str | None) -> tuple[str, str]:
    """Return the preset to use and a sentence saying why, for the log and the page."""
    if requested:
        return requested, ""
    import torch

    # device_count reads the driver without creating a CUDA context.
    if torch.cuda.device_count() > 0:
        return GPU_PRESET, f"No preset was named and a GPU was found, so this site runs the {GPU_PRESET} preset."
    return CPU_PRESET, f"No preset was named and no GPU was found, so this site runs the {CPU_PRESET} preset."


def prepare_environment(data_dir: Path) -> None:
    """Set Gradio's process-wide settings before Gradio is imported."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Uploads and outputs go under the data folder, where Gradio's delete_cache can bound them.
    os.environ.setdefault("GRADIO_TEMP_DIR", str((data_dir / "gradio-tmp").resolve()))


def create_site(preset_name: str | None = None, data_dir: Path | None = None, *, devices: list[str] | None = None):
    """Build (demo, services) for a preset name or path. Loads no model."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    prepare_environment(data_dir)
    from kit import site
    from kit.presets import load_preset
    from kit.services import build_services

    name, notice = choose_preset(preset_name or os.environ.get("KIT_PRESET"))
    if notice:
        logger.info(notice)
    preset = load_preset(name)
    services = build_services(preset, data_dir, devices=devices)
    demo = site.build(services, notice=notice)
    demo.queue(**site.queue_options(services))
    demo.kit_services = services  # type: ignore[attr-defined]
    demo.kit_launch_options = site.launch_options(services)  # type: ignore[attr-defined]
    logger.info("site %r built from %s; data folder %s", preset.name, preset.source, services.data_dir)
    return demo, services


def __getattr__(name: str) -> Any:
    # Module attribute built on first access (PEP 562), so that importing app builds nothing.
    if name == "demo":
        demo, _ = create_site()
        globals()["demo"] = demo
        return demo
    raise AttributeError(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Start a Microsite Kit site.")
    parser.add_argument("--preset", default=None, help="shipped preset name or path of a .toml file (default: $KIT_PRESET, else sdxl-turbo with a GPU and demo without)")
    parser.add_argument("--host", default=os.environ.get("KIT_HOST", "127.0.0.1"), help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("KIT_PORT", DEFAULT_PORT)), help="port to listen on")
    parser.add_argument("--data-dir", type=Path, default=None, help="data folder for the gallery and built models (default: $KIT_DATA_DIR or ./data)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--log-level", default=os.environ.get("KIT_LOG_LEVEL", "INFO"), help="logging level")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kit.errors import KitError

    try:
        demo, services = create_site(args.preset, args.data_dir)
    except KitError as exc:
        logger.error("%s", exc)
        return 2
    services.models.start()
    if services.models.zerogpu:
        # On ZeroGPU each job runs in a forked worker, so the weights must be loaded before
        # the first job. Loading inside the worker would repeat the load for every job.
        from kit.warmup import warm_up

        warm_up(services)
    elif services.preset.memory.warm_up:
        from kit.warmup import warm_up_in_background

        warm_up_in_background(services)
    options = dict(demo.kit_launch_options)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
