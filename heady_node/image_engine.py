"""The diffusers side of the image engine: load a pipeline, turn an ImageJob into image files.

Generation, image-to-image and inpainting share one set of weights: `AutoPipelineFor*.from_pipe`
builds the other two pipelines around the same modules without loading or copying anything
(diffusers' "reuse components" API), so /v1/images/edits costs no extra GPU memory.
Edits follow OpenAI's mask rule: the fully transparent pixels (alpha 0) of the mask, or of the
image itself when no mask is sent, are the ones re-drawn; with no transparency at all the whole
image is re-drawn image-to-image, keeping its composition (`strength` says how much).

torch, diffusers and Pillow are imported here and nowhere else in heady_node, so the rest of the
package (the guard runs inside vLLM; the CLI runs anywhere) never pays for them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from heady_node.image_api import ImageJob
from heady_node.image_presets import ImageModel

# Decoding an edit's upload: refuse images that would decode to more than this many pixels
# (a small PNG can claim gigapixels); 4096 x 4096 is far above any preset's largest side.
MAX_INPUT_PIXELS = 4096 * 4096


class ImageInputError(ValueError):
    """The uploaded image or mask cannot be used (400, not a server error)."""


def encode(image: Any, fmt: str, quality: int | None) -> bytes:
    """A PIL image as PNG / JPEG / WebP bytes. PNG ignores `quality` (always lossless)."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality or 90)
    else:
        image.save(buf, format="WEBP", quality=quality or 90)
    return buf.getvalue()


def open_image(data: bytes, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_INPUT_PIXELS:
            raise ImageInputError(f"{what} is {w}x{h}: larger than {MAX_INPUT_PIXELS} pixels")
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageInputError(f"{what} is not a readable PNG, JPEG or WebP image") from exc
    return img


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data)).size
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageInputError("image is not a readable PNG, JPEG or WebP image") from exc


def edit_mask(image: Any, mask: Any | None) -> Any | None:
    """diffusers' mask (white = re-draw) from OpenAI's (alpha 0 = re-draw), or None when nothing
    is transparent (then the edit is image-to-image over the whole picture)."""
    source = mask if mask is not None else image
    if "A" not in source.getbands():
        if mask is not None:
            raise ImageInputError("mask must be a PNG with an alpha channel (transparent = edit)")
        return None
    alpha = source.getchannel("A")
    lo, _ = alpha.getextrema()
    if lo != 0:
        if mask is not None:
            raise ImageInputError("mask has no fully transparent pixels: nothing to edit")
        return None
    return alpha.point(lambda a: 255 if a == 0 else 0)


def edit_steps(steps: int, strength: float) -> int:
    """Image-to-image runs int(steps x strength) steps: raise `steps` so at least one runs
    (the Turbo model cards: 'num_inference_steps * strength >= 1')."""
    return max(steps, math.ceil(1.0 / strength - 1e-9))


@dataclass
class DiffusersEngine:
    """One pipeline on one device; `generate` is called from one worker thread at a time."""

    pipe: Any  # a text-to-image DiffusionPipeline
    device: str
    batch: int = 1
    _img2img: Any = None
    _inpaint: Any = None

    @classmethod
    def load(
        cls, model: ImageModel, device: str = "cuda", batch: int = 1, memory_fraction: float = 0.0
    ) -> DiffusersEngine:
        """From the hub cache (downloads on first use), fp16 on the GPU."""
        import torch
        from diffusers import AutoencoderKL, AutoPipelineForText2Image

        if memory_fraction and device.startswith("cuda"):
            # An over-large request then fails here with OutOfMemoryError instead of eating
            # into the card's memory that vLLM's KV cache counts on.
            torch.cuda.set_per_process_memory_fraction(memory_fraction)
        kwargs: dict[str, Any] = {"torch_dtype": torch.float16}
        if model.variant:
            kwargs["variant"] = model.variant
        if model.vae_repo:
            kwargs["vae"] = AutoencoderKL.from_pretrained(model.vae_repo, torch_dtype=torch.float16)
        pipe = AutoPipelineForText2Image.from_pretrained(model.repo, **kwargs).to(device)
        return cls.around(pipe, device, batch)

    @classmethod
    def around(cls, pipe: Any, device: str, batch: int = 1) -> DiffusersEngine:
        pipe.set_progress_bar_config(disable=True)
        if batch > 1:
            pipe.vae.enable_slicing()  # decode a batch one image at a time: less peak memory
        return cls(pipe, device, batch)

    def _edit_pipes(self) -> tuple[Any, Any]:
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
            self._inpaint = AutoPipelineForInpainting.from_pipe(self.pipe)
            for p in (self._img2img, self._inpaint):
                p.set_progress_bar_config(disable=True)
        return self._img2img, self._inpaint

    def _generator(self, seed: int | None) -> Any:
        if seed is None:
            return None
        import torch

        return torch.Generator(device=self.device).manual_seed(seed)

    def warm_up(self) -> None:
        """One smallest image: proves the whole path (weights, kernels, VAE) before /health."""
        self.pipe(
            "warm-up", num_inference_steps=1, guidance_scale=0.0, height=64, width=64,
            output_type="pil",
        )  # fmt: skip

    def generate(self, job: ImageJob) -> list[bytes]:
        """The job's n images, encoded. Raises ImageInputError for unusable uploads."""
        import torch

        common: dict[str, Any] = {
            "prompt": job.prompt,
            "guidance_scale": job.guidance,
            "generator": self._generator(job.seed),
            "output_type": "pil",
        }
        if job.negative_prompt and job.guidance > 1.0:
            # Without classifier-free guidance (Turbo models, guidance 0) there is no negative
            # branch for the prompt to steer.
            common["negative_prompt"] = job.negative_prompt
        if job.image is None:
            call, extra = self.pipe, {"num_inference_steps": job.steps}
        else:
            call, extra = self._edit_call(job)
        images: list[Any] = []
        with torch.inference_mode():
            for start in range(0, job.n, self.batch):
                k = min(self.batch, job.n - start)
                out = call(
                    **common, **extra, height=job.height, width=job.width,
                    num_images_per_prompt=k,
                )  # fmt: skip
                images.extend(out.images)
        return [encode(img, job.output_format, job.compression) for img in images]

    def _edit_call(self, job: ImageJob) -> tuple[Any, dict[str, Any]]:
        from PIL import Image

        assert job.image is not None and job.strength is not None
        src = open_image(job.image, "image")
        mask = open_image(job.mask, "mask") if job.mask is not None else None
        diff_mask = edit_mask(src, mask)
        size = (job.width, job.height)
        init = src.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        img2img, inpaint = self._edit_pipes()
        extra: dict[str, Any] = {
            "image": init,
            "strength": job.strength,
            "num_inference_steps": edit_steps(job.steps, job.strength),
        }
        if diff_mask is None:
            return img2img, extra
        extra["mask_image"] = diff_mask.resize(size, Image.Resampling.NEAREST)
        return inpaint, extra


def tiny_pipeline(seed: int = 0) -> Any:
    """A randomly initialised Stable Diffusion pipeline built from configs (no download), the
    way diffusers' own fast tests build theirs: the real code path on the CPU in seconds. Its
    images are noise; their size, format and count are real."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
    )  # fmt: skip
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, pad_token_id=1,
            vocab_size=1000,
        )
    )  # fmt: skip
    # transformers 5 builds an in-memory BPE when given no vocabulary files.
    tokenizer = CLIPTokenizer(model_max_length=77)
    # SD-Turbo's scheduler kind: "trailing" spacing makes 1 step start from pure noise.
    scheduler = EulerAncestralDiscreteScheduler(timestep_spacing="trailing", steps_offset=1)
    return StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
