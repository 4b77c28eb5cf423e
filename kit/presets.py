"""Preset files: one TOML file describes one microsite.

A preset is parsed with tomllib and validated with pydantic into a frozen ``Preset``. Every
field has a default, so a three-line preset works; unknown keys are errors, and every error
names the file, the key, the value received and what is allowed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kit.errors import PresetError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

# Parameters of the generator that a preset may let visitors change. Prompt is always shown.
VISITOR_PARAMETERS = (
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "num_images",
    "init_image",
    "strength",
)

MemoryStrategyName = Literal["auto", "gpu", "model_offload", "sequential_offload", "cpu"]
DtypeName = Literal["auto", "float16", "bfloat16", "float32"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteSettings(_Section):
    title: str = "Microsite Kit"
    description: str = "Type a prompt, get an image. Upload an image, get a description."
    logo: str | None = None
    theme: Literal["soft", "default", "base", "glass", "monochrome", "ocean", "citrus", "origin"] = "soft"
    accent_color: str = Field(default="indigo", pattern=r"^(#[0-9a-fA-F]{6}|[a-z]+)$")
    footer: str = ""
    examples: tuple[str, ...] = ()


class FeatureSettings(_Section):
    generator: bool = True
    describe: bool = True
    gallery: bool = True


class GeneratorDefaults(_Section):
    negative_prompt: str = ""
    steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=7.0, ge=0.0)
    width: int = Field(default=512, ge=8)
    height: int = Field(default=512, ge=8)
    num_images: int = Field(default=1, ge=1)
    strength: float = Field(default=0.6, gt=0.0, le=1.0)


class GeneratorLimits(_Section):
    min_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(default=50, ge=1, le=1000)
    min_size: int = Field(default=256, ge=8)
    max_size: int = Field(default=1024, ge=8)
    max_pixels: int = Field(default=1024 * 1024, ge=64)
    max_num_images: int = Field(default=4, ge=1, le=16)
    max_guidance_scale: float = Field(default=20.0, ge=0.0)
    max_prompt_chars: int = Field(default=1000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _ranges(self) -> GeneratorLimits:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) is above max_steps ({self.max_steps})")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) is above max_size ({self.max_size})")
        return self


class GeneratorSettings(_Section):
    model: str = "builtin:tiny-sd"
    revision: str | None = None
    variant: str | None = None
    vae: str | None = None
    dtype: DtypeName = "auto"
    scheduler: str | None = None
    family: Literal["auto", "sd", "sd2", "sdxl", "sd3", "flux"] = "auto"
    defaults: GeneratorDefaults = GeneratorDefaults()
    limits: GeneratorLimits = GeneratorLimits()
    visitor_parameters: tuple[str, ...] = VISITOR_PARAMETERS

    @model_validator(mode="after")
    def _consistent(self) -> GeneratorSettings:
        unknown = sorted(set(self.visitor_parameters) - set(VISITOR_PARAMETERS))
        if unknown:
            raise ValueError(
                f"visitor_parameters has unknown names {unknown}; allowed: {', '.join(VISITOR_PARAMETERS)}"
            )
        d, lim = self.defaults, self.limits
        if not lim.min_steps <= d.steps <= lim.max_steps:
            raise ValueError(f"defaults.steps ({d.steps}) is outside limits [{lim.min_steps}, {lim.max_steps}]")
        for name in ("width", "height"):
            value = getattr(d, name)
            if not lim.min_size <= value <= lim.max_size:
                raise ValueError(f"defaults.{name} ({value}) is outside limits [{lim.min_size}, {lim.max_size}]")
        if d.num_images > lim.max_num_images:
            raise ValueError(f"defaults.num_images ({d.num_images}) is above limits.max_num_images ({lim.max_num_images})")
        if d.guidance_scale > lim.max_guidance_scale:
            raise ValueError(
                f"defaults.guidance_scale ({d.guidance_scale}) is above limits.max_guidance_scale ({lim.max_guidance_scale})"
            )
        return self


class DescribeSettings(_Section):
    model: str = "builtin:tiny-blip"
    revision: str | None = None
    max_new_tokens: int = Field(default=40, ge=1, le=512)
    min_new_tokens: int = Field(default=0, ge=0)
    num_beams: int = Field(default=3, ge=1, le=16)
    repetition_penalty: float = Field(default=1.2, ge=1.0)
    prompt: str | None = None


class GallerySettings(_Section):
    scope: Literal["private", "shared"] = "private"
    page_size: int = Field(default=24, ge=1, le=200)


class QueueSettings(_Section):
    max_size: int = Field(default=20, ge=1)
    # Jobs that may run at once per model replica. One is right for a single GPU: a second
    # job on the same weights only contends for the same memory and compute.
    concurrency_per_replica: int = Field(default=1, ge=1, le=8)
    status_update_rate: float | Literal["auto"] = "auto"
    # Compatible jobs (same size, steps, guidance and mode) that wait for the same replica run
    # as one pipeline call of up to this many jobs. 1 turns batching off.
    max_batch_size: int = Field(default=4, ge=1, le=64)
    # Images in one batched call, across its jobs; caps the memory a batch can take.
    max_batch_images: int = Field(default=8, ge=1, le=256)
    # Milliseconds a job waits for compatible company when a replica is free. At 0 a job never
    # waits: batches form only from jobs that queued behind a running call. "auto" waits only
    # while the site is busy (the last call ran several jobs), until as many jobs wait as that
    # call ran plus those that waited behind it, or for half its time, at most 500 ms. So
    # visitors who resubmit as their results arrive share the next call. On a quiet site,
    # several jobs that arrive together wait up to 100 ms for the rest of their burst.
    batch_window_ms: float | Literal["auto"] = "auto"

    @field_validator("batch_window_ms")
    @classmethod
    def _window_range(cls, value: float | str) -> float | str:
        if value != "auto" and not 0.0 <= float(value) <= 1000.0:
            raise ValueError(f'batch_window_ms must be "auto" or between 0 and 1000, got {value}')
        return value


class MemorySettings(_Section):
    strategy: MemoryStrategyName = "auto"
    devices: Literal["auto", "all", "cpu"] | tuple[str, ...] = "auto"
    idle_unload_seconds: float = Field(default=900.0, ge=0.0)
    warm_up: bool = False
    vae_tiling_pixels: int = Field(default=1536 * 1536, ge=64)
    headroom_fraction: float = Field(default=0.1, ge=0.0, lt=0.9)


# Pillow warns above about 89 million pixels and raises at twice that, so the kit's own limit
# stays below both and the visitor gets the kit's message.
MAX_INPUT_PIXELS_CEILING = 8192 * 8192
_HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*(:[0-9]{1,5})?$", re.IGNORECASE)


class SecuritySettings(_Section):
    # Access control is on when a users file or an API tokens file is named here, or when the
    # KIT_USERS or KIT_API_TOKENS environment variable is set. Relative paths are read from
    # the preset file's folder.
    users_file: str | None = None
    api_tokens_file: str | None = None
    # Failed sign-ins allowed per client address per minute; 0 turns the limit off.
    login_attempts_per_minute: int = Field(default=10, ge=0)
    # Jobs (generate and describe) per identity: per minute, and queued or running at once.
    # An identity is the signed-in user (or the user an API token belongs to), else the
    # client address. 0 turns a limit off.
    jobs_per_minute: int = Field(default=0, ge=0)
    max_queued_per_identity: int = Field(default=0, ge=0)
    # Prompts that contain one of these words or phrases (whole words, any case) are rejected.
    blocked_terms: tuple[str, ...] = ()
    max_upload_mb: float = Field(default=20.0, gt=0.0, le=1024.0)
    # Largest visitor image in pixels (width x height), checked from the file header.
    max_input_pixels: int = Field(default=4096 * 4096, ge=64 * 64, le=MAX_INPUT_PIXELS_CEILING)
    # Hosts that API callers may give image URLs from: "images.example.com", "*.example.com",
    # optionally with ":port". Empty means image URLs are rejected; data URLs always work.
    url_allowlist: tuple[str, ...] = ()
    url_fetch_timeout_seconds: float = Field(default=10.0, gt=0.0, le=120.0)
    # Gradio deletes its temporary uploads and outputs older than this, checking as often.
    # 0 keeps them until the server stops.
    temp_max_age_seconds: int = Field(default=3600, ge=0)

    @model_validator(mode="after")
    def _entries(self) -> SecuritySettings:
        for term in self.blocked_terms:
            if not term.strip():
                raise ValueError("blocked_terms contains an empty term; remove it")
        for host in self.url_allowlist:
            if not _HOST_PATTERN.match(host):
                raise ValueError(
                    f"url_allowlist entry {host!r} is not a host name; use a name such as "
                    "'images.example.com', '*.example.com' or 'images.example.com:8443'"
                )
        return self


class Preset(_Section):
    name: str = "custom"
    source: str = "<memory>"
    site: SiteSettings = SiteSettings()
    features: FeatureSettings = FeatureSettings()
    generator: GeneratorSettings = GeneratorSettings()
    describe: DescribeSettings = DescribeSettings()
    gallery: GallerySettings = GallerySettings()
    queue: QueueSettings = QueueSettings()
    memory: MemorySettings = MemorySettings()
    security: SecuritySettings = SecuritySettings()


def preset_names() -> list[str]:
    """Return the names of the presets shipped in the ``presets`` folder."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.toml"))


def resolve_preset_path(name_or_path: str) -> Path:
    """Turn a shipped preset name or a file path into an existing file path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.parent != Path("."):
        if not candidate.is_file():
            raise PresetError(f"preset file {candidate} not found")
        return candidate
    shipped = PRESETS_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise PresetError(
            f"preset {name_or_path!r} not found; shipped presets: {', '.join(preset_names())}, "
            "or give the path of a .toml file"
        )
    return shipped


def _format_location(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location) or "(top level)"


def _lookup(data: dict[str, Any], location: tuple[Any, ...]) -> Any:
    value: Any = data
    for part in location:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list | tuple) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            return None
    return value


def parse_preset(data: dict[str, Any], source: str, name: str) -> Preset:
    """Validate a parsed preset mapping; raise PresetError naming the file, key and value."""
    try:
        return Preset.model_validate({**data, "source": source, "name": data.get("name", name)})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = error["loc"]
            key = _format_location(location)
            if error["type"] == "extra_forbidden":
                problems.append(f"  {key}: unknown key (check its spelling and section)")
                continue
            value = _lookup(data, location)
            shown = repr(value) if value is not None else "(from a rule across several keys)"
            problems.append(f"  {key} = {shown}: {error['msg']}")
        raise PresetError(f"invalid preset {source}:\n" + "\n".join(problems)) from None


def load_preset(name_or_path: str) -> Preset:
    """Read and validate a preset by shipped name (``demo``) or by path."""
    path = resolve_preset_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(
            f"preset {path} is not valid TOML: {exc}. Check for unquoted strings, a missing "
            "closing quote or bracket, and keys repeated within one section."
        ) from None
    return parse_preset(data, source=str(path), name=path.stem)
