"""Swin image backbone built from timm's blocks, arranged as the official Grounding DINO checkpoint expects.

The official Swin (and Hugging Face's port) pads a feature map to a multiple of the window size *before* the
cyclic shift; timm shifts first and pads after, which gives different numbers whenever a side is not a multiple
of the window. ``_OfficialSwinBlock`` keeps timm's parameters and attention but restores the official order, so
any input size gives the published model's outputs.

Parameter names follow the official ``backbone.0.*`` layout: ``patch_embed.{proj,norm}``,
``layers.{i}.blocks.{j}.*`` with the fused ``attn.qkv``, ``layers.{i}.downsample`` at the END of stage ``i`` and
one ``norm{i}`` per returned stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, window_partition, window_reverse
from torch import nn

from .config import SwinConfig


class _OfficialSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the official pad-then-shift order and a shift mask cached per padded size."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, always_partition=True, dynamic_mask=True, **kwargs)
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def _shift_mask(self, height_pad: int, width_pad: int, like: torch.Tensor) -> torch.Tensor | None:
        if not any(self.shift_size):
            return None
        if torch.jit.is_tracing():  # exporting: built from the runtime size in the graph, not cached
            return self._traced_shift_mask(height_pad, width_pad, like)
        key = (height_pad, width_pad, like.device, like.dtype)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = self.get_attn_mask(like.new_empty((1, height_pad, width_pad, 1)))
            if len(self._mask_cache) > 16:
                self._mask_cache.clear()
            self._mask_cache[key] = mask
        return mask

    def _traced_shift_mask(self, height_pad, width_pad, like: torch.Tensor) -> torch.Tensor:
        """timm's ``get_attn_mask`` as arithmetic on the padded size, which the tracer keeps symbolic (timm fills
        the regions by slice assignment): the same (windows, area, area) mask of 0 and -100."""
        window_h, window_w = self.window_size
        shift_h, shift_w = self.shift_size
        rows = torch.arange(height_pad, device=like.device)
        cols = torch.arange(width_pad, device=like.device)
        # Region 0, 1 or 2 along each side: before the last window, in it before the shift, in the shift.
        row_region = (rows >= height_pad - window_h).long() + (rows >= height_pad - shift_h).long()
        col_region = (cols >= width_pad - window_w).long() + (cols >= width_pad - shift_w).long()
        regions = (row_region[:, None] * 3 + col_region[None, :]).to(like.dtype)[None, :, :, None]  # (1, H, W, 1)
        windows = window_partition(regions, self.window_size).view(-1, self.window_area)
        mask = windows.unsqueeze(1) - windows.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's block forward (x (B, H, W, C)), with the updates cast to the stream's dtype before they are
        added: in mixed precision (gdino.model.precision) the stream is float32 and the updates bfloat16, and
        arithmetic mixing the two dtypes takes PyTorch's unvectorised CPU loop."""
        batch, height, width, channels = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)).to(x.dtype))
        x = x.reshape(batch, -1, channels)
        x = x + self.drop_path2(self.mlp(self.norm2(x)).to(x.dtype))
        return x.reshape(batch, height, width, channels)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape  # (B, H, W, C)
        window_h, window_w = self.window_size
        pad_h = (window_h - height % window_h) % window_h
        pad_w = (window_w - width % window_w) % window_w
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # pad first, as the official Swin does
        _, height_pad, width_pad, _ = x.shape
        shift_h, shift_w = self.shift_size
        if shift_h or shift_w:
            x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=self._shift_mask(height_pad, width_pad, x))
        x = window_reverse(windows.view(-1, window_h, window_w, channels), self.window_size, height_pad, width_pad)
        if shift_h or shift_w:
            x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


class _PatchEmbed(nn.Module):
    """4x4 patch embedding; pads the image on the right and bottom to a multiple of the patch size."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        pad_h = (self.patch_size - height % self.patch_size) % self.patch_size
        pad_w = (self.patch_size - width % self.patch_size) % self.patch_size
        if torch.jit.is_tracing() or pad_h or pad_w:  # exporting: the pads are computed in the graph
            images = F.pad(images, (0, pad_w, 0, pad_h))
        x = self.proj(images)  # (B, C, H/4, W/4)
        # Mixed precision (gdino.model.precision): the residual stream stays in the norm's float32.
        return self.norm(x.permute(0, 2, 3, 1).to(self.norm.weight.dtype))  # (B, H/4, W/4, C)


class _Stage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_path: list[float], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            _OfficialSwinBlock(
                dim=dim,
                input_resolution=(window_size, window_size),  # unused: masks are built per input size
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if index % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path[index],
            )
            for index in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None


class SwinBackbone(nn.Module):
    """Swin Transformer returning the normalised outputs of ``config.out_indices`` as (B, C, H, W) maps."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config
        self.patch_embed = _PatchEmbed(config.patch_size, config.embed_dim)
        total_blocks = sum(config.depths)
        rates = torch.linspace(0, config.drop_path_rate, total_blocks).tolist()
        self.layers = nn.ModuleList()
        start = 0
        for stage, depth in enumerate(config.depths):
            self.layers.append(
                _Stage(
                    dim=config.stage_channels(stage),
                    depth=depth,
                    num_heads=config.num_heads[stage],
                    window_size=config.window_size,
                    mlp_ratio=config.mlp_ratio,
                    drop_path=rates[start:start + depth],
                    downsample=stage < len(config.depths) - 1,
                )
            )
            start += depth
        for stage in config.out_indices:
            self.add_module(f"norm{stage}", nn.LayerNorm(config.stage_channels(stage)))

    @property
    def channels(self) -> tuple[int, ...]:
        return self.config.out_channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) -> one (B, C_i, H_i, W_i) map per returned stage."""
        x = self.patch_embed(images)  # (B, H/4, W/4, C)
        outputs = []
        for stage, layer in enumerate(self.layers):
            for block in layer.blocks:
                x = block(x)
            if stage in self.config.out_indices:
                normed = getattr(self, f"norm{stage}")(x)
                outputs.append(normed.permute(0, 3, 1, 2).contiguous())
            if layer.downsample is not None:
                x = layer.downsample(x).to(x.dtype)  # a float32 stream stays float32 in mixed precision
        return outputs
