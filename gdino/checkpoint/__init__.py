"""Checkpoint layouts, key mapping and safe I/O.

Three layouts are read, one is used inside groundwatch:

- **official** (``groundingdino_swint_ogc.pth`` and friends): a torch pickle with the weights under ``"model"``,
  keys ``backbone.0.*``, ``bert.*``, ``feat_map.*``, ``input_proj.*``, ``transformer.*``, ``bbox_embed.*``. This is
  the layout of ``gdino.model.GroundingDino.state_dict()``, so it is the working layout of this module.
- **Hugging Face** (``config.json`` + ``model.safetensors``, as ``GroundingDinoForObjectDetection.save_pretrained``
  writes it): keys under ``model.*``, q/k/v projections split. Two spellings exist: the one on disk (``"saved"``:
  hub files and ``save_pretrained`` output) and the in-memory ``state_dict()`` of transformers 5 (``"module"``:
  Swin under ``swin.``, ``q_proj``/``k_proj``/``v_proj``/``o_proj``). Both are read; either can be written.
- **groundwatch** (``groundwatch convert`` output): a folder with ``groundwatch.json`` (format version and our
  config) and ``model.safetensors`` in the official key layout, plus ``vocab.txt`` when the source had one.

Nothing here unpickles arbitrary objects: ``.pth`` files are read with ``torch.load(weights_only=True)`` and
everything else is safetensors. Every failure is a :class:`CheckpointError` with a message meant for a person.

Files, along the seams: ``formats`` (the folder's names, ``CheckpointError``), ``rename`` (the official <->
Hugging Face rename table, q/k/v split and merge), ``hf_config`` (config translation, a config inferred from
weights), ``accounting`` (strict key checks, ``load_state``), ``io`` (reading, writing, ``convert``).
"""

from .accounting import check_keys, load_state
from .formats import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, VOCAB_FILE, WEIGHTS_FILE, CheckpointError, StateDict
from .hf_config import config_from_hf, config_to_hf, expected_shapes, infer_config
from .io import convert, read_checkpoint, save
from .rename import drop_ignored_official, hf_to_official, is_hf_layout, is_official_layout, official_to_hf

__all__ = ["CONFIG_FILE", "FORMAT_NAME", "FORMAT_VERSION", "VOCAB_FILE", "WEIGHTS_FILE", "CheckpointError", "StateDict",
           "check_keys", "config_from_hf", "config_to_hf", "convert", "drop_ignored_official", "expected_shapes",
           "hf_to_official", "infer_config", "is_hf_layout", "is_official_layout", "load_state", "official_to_hf",
           "read_checkpoint", "save"]
