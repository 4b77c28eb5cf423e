"""Build tiny random-weight models from configs, for the offline demo and the tests.

The models are written with ``save_pretrained`` so that the kit loads them through the same
``from_pretrained`` code as hub models. Weights come from fixed seeds, so two builds are
identical. They draw coloured noise and caption it with random words: they prove the
plumbing, not the quality.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_SD = "tiny-sd"
TINY_SDXL = "tiny-sdxl"
TINY_BLIP = "tiny-blip"
BUILDERS = (TINY_SD, TINY_SDXL, TINY_BLIP)

# Words for the tiny tokenizers. They only need to cover what tests type; anything else
# falls back to byte-level pieces (CLIP) or [UNK] (BLIP).
_WORDS = (
    "a an the of on in with and red green blue yellow white black orange purple circle "
    "square triangle star small large big top bottom left right center background "
    "gradient photo cat dog house tree sky sea mountain portrait painting city night"
).split()


def _byte_alphabet() -> list[str]:
    """Return the 256 printable characters that byte-level BPE uses to stand for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = 0
    symbols = []
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    for word in _WORDS:
        vocab.setdefault(word + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # Whole-word merges are built letter by letter so that the tokenizer can reach them.
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merged = left + right
            vocab.setdefault(merged, len(vocab))
            if (left, right) not in merges:
                merges.append((left, right))
            pieces = [merged] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _clip_text_encoder(vocab_size: int, projection: bool = False, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_class(config).eval()


def _vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_sd(target: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    text_encoder = _clip_text_encoder(len(tokenizer), seed=1)
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=_vae(seed=3),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(target)


def build_tiny_sdxl(target: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    text_encoder = _clip_text_encoder(len(tokenizer), seed=1)
    text_encoder_2 = _clip_text_encoder(len(tokenizer), projection=True, seed=4)
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
        norm_num_groups=32,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed=3),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
    )
    pipe.save_pretrained(target)


def build_tiny_blip(target: Path) -> None:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *_WORDS, ".", ","]
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch) / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer(str(vocab_file), bos_token="[DEC]")
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(5)
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "encoder_hidden_size": 32,
            "bos_token_id": vocab.index("[DEC]"),
            "pad_token_id": 0,
            "sep_token_id": vocab.index("[SEP]"),
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(target)
    processor.save_pretrained(target)


_BUILD = {TINY_SD: build_tiny_sd, TINY_SDXL: build_tiny_sdxl, TINY_BLIP: build_tiny_blip}


def ensure_tiny_model(name: str, models_dir: Path) -> Path:
    """Build the named tiny model under ``models_dir`` unless a complete copy is there.

    The build goes to a temporary folder that is renamed into place, so an interrupted build
    never leaves a half-written model that a later start would try to load.
    """
    if name not in _BUILD:
        raise ValueError(f"unknown built-in model {name!r}; expected one of {', '.join(BUILDERS)}")
    target = models_dir / name
    if (target / ".complete").exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    _BUILD[name](scratch)
    (scratch / ".complete").write_text("built by kit.tiny\n", encoding="utf-8")
    try:
        os.rename(scratch, target)
    except OSError:
        # Another process finished the same build first; its copy is identical.
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("built %s in %.2f s at %s", name, time.perf_counter() - started, target)
    return target
