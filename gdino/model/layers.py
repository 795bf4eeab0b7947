"""The building blocks of Grounding DINO: position embeddings, the feed-forward step, small heads, and the three
attention modules (multi-head, multi-scale deformable through ``gw_kernels.ms_deform_attn``, and the image<->text
bi-attention of the feature enhancer)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gw_kernels import ms_deform_attn

from .precision import float32_region


# The original IDEA-Research code, which the published weights were trained with, clamps at 1e-3; transformers
# (and DETR) at 1e-5. The two differ only where a box coordinate or side is within 1e-3 of 0 or 1 (under about a
# pixel at 800 px), by up to ~4e-3 in the logits there. We follow the original everywhere: the transformers
# parity tests still hold within their tolerance, since no reference box of theirs is that small.
INVERSE_SIGMOID_EPS = 1e-3


def inverse_sigmoid(x: torch.Tensor, eps: float = INVERSE_SIGMOID_EPS) -> torch.Tensor:
    """log(x / (1 - x)) with numerator and denominator clamped at ``eps``, as the original ``inverse_sigmoid``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """A bfloat16 or float16 result as float32 (float32 and float64 unchanged)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
        self.backend = "auto"  # gw_kernels.ms_deform_attn backend: "auto", "reference", "cpu" or "triton"
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
        batch, _, dim = query.shape
        heads = self.num_heads
        value = self.value_proj(value_input)
        if value_valid is not None:
            value = value.masked_fill(~value_valid[..., None], 0.0)
        value = value.view(batch, -1, heads, dim // heads)  # (B, S, M, D)
        with float32_region(query.device):  # in mixed precision: bfloat16 products, float32 locations and weights
            query = query.to(self.sampling_offsets.weight.dtype)
            weights, locations = self._sampling(query, reference_points, spatial_shapes)
        # (B, Q, M, L, P, 2) xy in [0, 1]; the kernel keeps locations in float32.
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations.float(), weights,
                                backend=self.backend)
        return self.output_proj(output.to(self.output_proj.weight.dtype))

    def _sampling(self, query, reference_points, spatial_shapes):
        """-> attention weights (B, Q, M, L, P) and sampling locations (B, Q, M, L, P, 2) xy in [0, 1]."""
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        # Mixed precision (gdino.model.precision): the two projections multiply in bfloat16 (at 6,380 encoder
        # queries they were the largest float32 matmuls left), their outputs come back to float32 before the
        # softmax and before the reference is added: a bfloat16 location would be 0.16 cells off at 80 cells.
        weights = _at_least_float32(self.attention_weights(query)).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(reference_points.dtype)
            if torch.is_grad_enabled():
                offsets = _at_least_float32(self.sampling_offsets(query))
                offsets = offsets.view(batch, num_queries, heads, levels, points, 2)
                locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            else:
                # Inference: the division by each level's size folded into the projection's rows (a 256-row
                # rescale instead of a pass over the (B, Q, M, L, P, 2) offsets), the reference added in place.
                weight = self.sampling_offsets.weight
                scale = normalizer.reciprocal()[None, :, None, :].expand(heads, levels, points, 2).reshape(-1)
                offsets = _at_least_float32(F.linear(query, (weight * scale[:, None]).to(weight.dtype),
                                                     (self.sampling_offsets.bias * scale).to(weight.dtype)))
                # The reference repeated over the points (a (B, Q, L*P*2) copy, 1/8 of the offsets) so the add
                # runs along contiguous rows of L*P*2: broadcast over the points' pairs of x, y it ran 50x slower.
                reference = reference_points.to(offsets.dtype)[:, :, :, None, :].expand(-1, -1, -1, points, -1)
                locations = offsets.view(batch, num_queries, heads, levels * points * 2).add_(
                    reference.reshape(batch, num_queries, 1, levels * points * 2))
                locations = locations.view(batch, num_queries, heads, levels, points, 2)
        else:
            offsets = _at_least_float32(self.sampling_offsets(query))
            offsets = offsets.view(batch, num_queries, heads, levels, points, 2)
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
        return weights, locations


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
            # One (B, h*T, S) @ (B, S, C) product: broadcasting vision over the heads copied it h times.
            pooled = (text_probs.reshape(batch, heads * length_t, length_v) @ vision).view(
                batch, heads, length_t, dim)  # (B, h, T, C)
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
