"""Removal with a diffusers inpainting pipeline loaded from a local folder (`pip install groundwatch[edit]`).

Each padded box is cut out with context around it (the crop is `context` times the box on each side, clipped to
the frame), resized to the pipeline's own resolution, inpainted under the box's mask, resized back, and only the
pixels under the mask are pasted into the frame: everything outside the boxes stays bit for bit. Nothing is
downloaded: the folder is read with `local_files_only`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class InpaintModelError(RuntimeError):
    """The inpainting pipeline cannot be used; the message says what to install or fix."""


class DiffusersInpainter:
    """`inpainter(frame (H, W, 3) uint8 RGB, boxes (N, 4) int xyxy) -> new frame`, for `write_redacted`."""

    def __init__(self, path: str | Path, *, device: str = "cpu", steps: int = 20, prompt: str = "background",
                 seed: int = 0, context: float = 0.5) -> None:
        try:
            import diffusers
        except ImportError:
            raise InpaintModelError("--inpaint-model needs the diffusers library, which groundwatch's 'edit' extra "
                                    "installs: pip install 'groundwatch[edit]'") from None
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise InpaintModelError(f"{path} is not a diffusers pipeline folder (no model_index.json); give the "
                                    "folder a pipeline was saved to (save_pretrained), nothing is downloaded")
        try:
            pipeline = diffusers.AutoPipelineForInpainting.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InpaintModelError(f"cannot load an inpainting pipeline from {path}: {exc}") from None
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline.to(device)
        self.steps, self.prompt, self.seed, self.context, self.device = steps, prompt, seed, context, device
        sample_size = getattr(getattr(pipeline, "unet", None), "config", None)
        sample_size = getattr(sample_size, "sample_size", None)
        scale = getattr(pipeline, "vae_scale_factor", 8)
        if isinstance(sample_size, (tuple, list)):
            sample_size = sample_size[0]
        self.resolution = int(sample_size * scale) if sample_size else 512

    def _inpaint(self, crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 crop and (h, w) bool mask -> (h, w, 3) uint8, run at the pipeline's resolution."""
        import torch
        from PIL import Image

        side = self.resolution
        image = Image.fromarray(cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA))
        mask_image = Image.fromarray(cv2.resize(mask.astype(np.uint8) * 255, (side, side),
                                                interpolation=cv2.INTER_NEAREST))
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        result = self.pipeline(prompt=self.prompt, image=image, mask_image=mask_image, height=side, width=side,
                               num_inference_steps=self.steps, generator=generator, output_type="np").images[0]
        result = (np.clip(result, 0.0, 1.0) * 255).round().astype(np.uint8)  # (side, side, 3) RGB
        return cv2.resize(result, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_LINEAR)

    def __call__(self, frame: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
        out = frame.copy()
        height, width = frame.shape[:2]
        for x1, y1, x2, y2 in np.asarray(boxes_xyxy, dtype=np.int64).reshape(-1, 4):
            if x2 <= x1 or y2 <= y1:
                continue
            grow_x, grow_y = int(np.ceil((x2 - x1) * self.context)), int(np.ceil((y2 - y1) * self.context))
            cx1, cy1 = max(0, x1 - grow_x), max(0, y1 - grow_y)
            cx2, cy2 = min(width, x2 + grow_x), min(height, y2 + grow_y)
            crop = out[cy1:cy2, cx1:cx2]
            mask = np.zeros(crop.shape[:2], dtype=bool)
            mask[y1 - cy1:y2 - cy1, x1 - cx1:x2 - cx1] = True
            filled = self._inpaint(np.ascontiguousarray(crop), mask)
            crop[mask] = filled[mask]
        return out
