"""Live previews while denoising: latents to a small RGB image with no VAE decode.

Each model family gets a fixed linear map from its latent channels to RGB (plus a bias),
applied per latent cell and then upscaled. It costs one small matrix product per preview,
so it can run inside ``callback_on_step_end`` without slowing the job. The colours are an
approximation of what the VAE would decode; edges and fine detail are not.

The coefficients are least-squares fits of VAE-decoded RGB on latents in the space the
denoiser works in (after the VAE scaling and shift). They are the values published by the
ComfyUI project for its latent previews; the kit has not refitted them.
"""

from __future__ import annotations

from typing import Any

# Preview images are upscaled (bilinear) until their longer side reaches this many pixels.
PREVIEW_MAX_SIDE = 256

# Rows are latent channels, columns are R, G, B contributions in [-1, 1] space.
_SD_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SD_BIAS = (0.0, 0.0, 0.0)

_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)

_SD3_FACTORS = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)
_SD3_BIAS = (0.2394, 0.2135, 0.1925)

_FLUX_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
_FLUX_BIAS = (-0.0329, -0.0718, -0.0851)

# Family name (kit.families) -> (factors, bias). SD 2 shares SD 1's VAE.
LATENT_RGB_MAPS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, float, float]]] = {
    "sd": (_SD_FACTORS, _SD_BIAS),
    "sd2": (_SD_FACTORS, _SD_BIAS),
    "sdxl": (_SDXL_FACTORS, _SDXL_BIAS),
    "sd3": (_SD3_FACTORS, _SD3_BIAS),
    "flux": (_FLUX_FACTORS, _FLUX_BIAS),
}


def unpack_flux_latents(latents: Any, height: int, width: int, vae_scale_factor: int = 8) -> Any:
    """Turn Flux's packed latents (batch, tokens, channels x 2 x 2) into (batch, channels, h, w).

    ``height`` and ``width`` are the image size in pixels. Flux packs each 2x2 patch of
    latent cells into one token, so the token grid is half the latent grid on each side.
    """
    batch, tokens, packed_channels = latents.shape
    rows = 2 * (int(height) // (vae_scale_factor * 2))
    columns = 2 * (int(width) // (vae_scale_factor * 2))
    if tokens != (rows // 2) * (columns // 2):
        raise ValueError(
            f"packed latents have {tokens} tokens but a {width}x{height} image needs {(rows // 2) * (columns // 2)}"
        )
    channels = packed_channels // 4
    grid = latents.reshape(batch, rows // 2, columns // 2, channels, 2, 2)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, rows, columns)


def latents_to_rgb(latents: Any, family: str) -> Any:
    """Map the first latent of a batch, shape (channels, h, w) or (batch, channels, h, w), to uint8 (h, w, 3).

    Raises ValueError for a family with no map or a channel count that does not match it.
    """
    import torch

    if family not in LATENT_RGB_MAPS:
        raise ValueError(f"no latent preview map for model family {family!r}; known: {', '.join(LATENT_RGB_MAPS)}")
    factors, bias = LATENT_RGB_MAPS[family]
    first = latents[0] if latents.dim() == 4 else latents
    if first.dim() != 3 or first.shape[0] != len(factors):
        raise ValueError(
            f"{family} previews need latents with {len(factors)} channels, got shape {tuple(latents.shape)}"
        )
    cells = first.detach().to(device="cpu", dtype=torch.float32)
    matrix = torch.tensor(factors, dtype=torch.float32)
    offset = torch.tensor(bias, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", cells, matrix) + offset
    # The map outputs roughly [-1, 1], the VAE's output range.
    scaled = ((rgb.clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).numpy()


def preview_image(
    latents: Any,
    family: str,
    *,
    height: int | None = None,
    width: int | None = None,
    max_side: int = PREVIEW_MAX_SIDE,
) -> Any:
    """Return a PIL preview of the first image in ``latents``, upscaled to ``max_side`` on its longer side.

    Packed (3-dimensional) Flux latents need the image ``height`` and ``width`` in pixels.
    """
    from PIL import Image

    if latents.dim() == 3 and family == "flux":
        if height is None or width is None:
            raise ValueError("packed Flux latents need the image height and width to be unpacked")
        latents = unpack_flux_latents(latents[:1], height, width)
    image = Image.fromarray(latents_to_rgb(latents, family))
    scale = max_side / max(image.size)
    if scale > 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image


__all__ = ["LATENT_RGB_MAPS", "PREVIEW_MAX_SIDE", "latents_to_rgb", "preview_image", "unpack_flux_latents"]
