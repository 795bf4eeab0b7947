"""The feature enhancer (encoder: deformable image self-attention, text self-attention, image<->text fusion),
the cross-modality decoder, and the transformer that joins them with language-guided query selection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GroundingDinoConfig
from ..text import TextEncoding
from .layers import (MLP, BiAttention, DropPath, MSDeformAttn, MultiheadAttention, contrastive_logits, feed_forward,
                     inverse_sigmoid, sine_embedding)
from .precision import float32_region


def cell_positions(size, offset: float, dtype, device) -> torch.Tensor:
    """(size,) cell positions ``offset, offset + 1, ..., offset + size - 1`` along one side of a feature map.

    Exporting (``gdino.export``), ``size`` is a traced tensor and ``arange`` keeps it symbolic (``linspace`` takes a
    Python int, which the tracer would record as a constant); the numbers are the same, the steps being 1."""
    if torch.jit.is_tracing():
        return torch.arange(size, device=device).to(dtype) + offset
    return torch.linspace(offset, size - 1 + offset, size, dtype=dtype, device=device)


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
        # In mixed precision the updates are bfloat16 and the streams float32: cast first, since arithmetic
        # mixing the two dtypes takes PyTorch's unvectorised CPU loop (measured 5x slower than cast + add).
        return (vision + self.drop_path(self.gamma_v * delta_vision.to(vision.dtype)),
                text + self.drop_path(self.gamma_l * delta_text.to(text.dtype)))


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
        # .to: bfloat16 updates of the float32 stream (mixed precision) are cast before the add, see FusionLayer.
        vision = self.norm1(vision + F.dropout(attended.to(vision.dtype), self.dropout, self.training))
        hidden = feed_forward(vision, self.linear1, self.linear2, self.dropout, self.training, workspace)
        return self.norm2(vision + F.dropout(hidden.to(vision.dtype), self.dropout, self.training))


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
                cell_positions(height, 0.5, valid_ratios.dtype, valid_ratios.device),
                cell_positions(width, 0.5, valid_ratios.dtype, valid_ratios.device),
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
        # .to: bfloat16 updates of the float32 stream (mixed precision) are cast before the add, see FusionLayer.
        dtype = queries.dtype
        q = queries + query_pos
        queries = self.norm2(queries + self._drop(self.self_attn(q, q, queries, allowed=self_allowed).to(dtype)))
        attended = self.ca_text(queries + query_pos, text, text, allowed=text_allowed)
        queries = self.catext_norm(queries + self._drop(attended.to(dtype)))
        attended = self.cross_attn(queries + query_pos, reference_points, memory, spatial_shapes,
                                   level_start_index, memory_valid)
        queries = self.norm1(queries + self._drop(attended.to(dtype)))
        hidden = feed_forward(queries, self.linear1, self.linear2, self.dropout, self.training, workspace)
        return self.norm3(queries + self._drop(hidden.to(dtype)))


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
            with float32_region(queries.device):  # box refinement: sigmoid/inverse-sigmoid across the layers
                head = self.bbox_embed[index]
                delta = head(queries.to(head.layers[0].weight.dtype))
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
                cell_positions(height, 0.0, dtype, memory_valid.device),
                cell_positions(width, 0.0, dtype, memory_valid.device),
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
        spatial_shapes_list = [(src.shape[-2], src.shape[-1]) for src in sources]
        # (B, S, C); in mixed precision the encoder's residual stream is float32, like level_embed
        flat_sources = torch.cat([src.flatten(2).transpose(1, 2) for src in sources], 1).to(self.level_embed.dtype)
        flat_valid = torch.cat([mask.flatten(1) for mask in masks], 1)  # (B, S)
        flat_pos = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                              for level, pos in enumerate(positions)], 1)
        if torch.jit.is_tracing():  # exporting: the sizes are traced tensors; stacked, the graph computes them
            spatial_shapes = torch.stack([torch.stack([torch.as_tensor(side) for side in shape])
                                          for shape in spatial_shapes_list]).to(torch.long)
        else:
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
        # In float32 under mixed precision: the k-th ranked token gets the k-th content query, and bfloat16's
        # rounding of the scores (a step of 0.125 at 20) would reorder near-tied ranks.
        with float32_region(memory.device):
            head_dtype = self.enc_output.weight.dtype
            memory_head, memory_text_head = memory.to(head_dtype), memory_text.to(head_dtype)
            anchors, usable = self.proposals(flat_valid, spatial_shapes_list, head_dtype)
            selected_memory = self.enc_output_norm(self.enc_output(memory_head.masked_fill(~usable, 0.0)))
            encoder_logits = contrastive_logits(selected_memory, memory_text_head, text.token_mask)  # (B, S, T)
            if torch.jit.is_tracing():  # exporting: S is the runtime number of image tokens
                num_queries = torch.clamp(torch.as_tensor(encoder_logits.shape[1]), max=self.config.num_queries)
            else:
                num_queries = min(self.config.num_queries, encoder_logits.shape[1])
            top = torch.topk(encoder_logits.max(-1)[0], num_queries, dim=1)[1]  # (B, Q)
            # The box head is per token: run it on the Q selected tokens only, not on all S.
            top_memory = torch.gather(selected_memory, 1,
                                      top[..., None].expand(-1, -1, selected_memory.shape[-1]))
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
