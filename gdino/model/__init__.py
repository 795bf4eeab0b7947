"""Grounding DINO: Swin + BERT dual encoder, feature enhancer, language-guided query selection, cross-modality
decoder, contrastive token head. No NMS.

Module and parameter names follow the official checkpoint (``backbone.0``, ``bert``, ``feat_map``, ``input_proj``,
``transformer.{encoder,decoder,...}``, ``bbox_embed``), so an official ``.pth`` loads with no renaming and the
Hugging Face layout maps onto it with one table (``gdino.checkpoint``). The numbers equal those of
``transformers.GroundingDinoForObjectDetection`` within float tolerance; where the two official implementations
disagree (the inverse-sigmoid epsilon) this follows the original code the published weights were trained with.

Speed, with the same results up to float rounding:
- the text branch (BERT + ``feat_map``) runs once per prompt and is cached (``encode_text``);
- the image<->text fusion folds its 1024-wide projections into the few text tokens when that is cheaper
  (``BiAttention``), which removes most of the encoder's fusion FLOPs for short prompts;
- multi-scale deformable attention goes through ``gw_kernels.ms_deform_attn`` (Triton on GPU, a fast CPU path).

The package holds the model in four files along its seams:

- ``layers``: position embeddings, the feed-forward step, small heads, the attention modules;
- ``transformer``: encoder (feature enhancer), decoder and query selection;
- ``grounding_dino``: ``GroundingDino`` (the module, the text cache, ``detect``/``refer``) and its output;
- ``text_encoder``: the BERT/MiniLM text encoder and its packaged weights.
"""

from .grounding_dino import TEXT_CACHE_SIZE, GroundingDino, GroundingDinoOutput, pad_images
from .layers import INVERSE_SIGMOID_EPS, MSDeformAttn, feed_forward, inverse_sigmoid, sine_embedding, sine_position_map
from .text_encoder import build_text_encoder, load_minilm
from .transformer import Transformer

__all__ = ["GroundingDino", "GroundingDinoOutput", "INVERSE_SIGMOID_EPS", "MSDeformAttn", "TEXT_CACHE_SIZE",
           "Transformer", "build_text_encoder", "feed_forward", "inverse_sigmoid", "load_minilm", "pad_images",
           "sine_embedding", "sine_position_map"]
