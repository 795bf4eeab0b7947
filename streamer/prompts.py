"""The one check of a prompt, shared by the config, the control socket and the inference worker.

Two levels: `prompt_problem` is cheap (words present, a bounded length in characters) and runs anywhere, even
where the model's tokenizer is not loaded (the control socket); `check_prompt` adds the token count against
`model.max_prompt_tokens` and the text encoder's window, and is what the config and the worker run. Both give
the reason in words, the same words wherever a prompt is refused.
"""

from __future__ import annotations

import re

MAX_PROMPT_CHARS = 20_000  # far above any token limit: refuses a runaway request before it is tokenised
DEFAULT_MAX_PROMPT_TOKENS = 1024  # 4 passes of the text encoder's 256-token window


class PromptProblem(ValueError):
    """A prompt the detector cannot use; the message says why."""


def prompt_problem(prompt: object) -> str | None:
    """Why `prompt` cannot be used, or None. The same rule as `gdino.text.normalize_caption`: a prompt must
    contain a word character once lowercased and stripped."""
    if not isinstance(prompt, str):
        return f"a prompt must be a string, got {type(prompt).__name__}"
    if len(prompt) > MAX_PROMPT_CHARS:
        return (f"the prompt has {len(prompt)} characters, more than {MAX_PROMPT_CHARS}; prompts are bounded by "
                "model.max_prompt_tokens")
    if not re.search(r"\w", prompt.lower().strip()):
        return f"the prompt {prompt[:60]!r} has no words: give phrases such as 'red car . person .'"
    return None


def check_prompt(prompt: object, max_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, tokenizer=None) -> None:
    """Raise `PromptProblem` unless the detector can encode `prompt` within `max_tokens` tokens.

    Counts with the model's WordPiece tokenizer (the bundled vocabulary unless `tokenizer` is given) and runs
    the same split into encoder passes that the detector runs, so a phrase too long for one pass is caught here.
    """
    problem = prompt_problem(prompt)
    if problem:
        raise PromptProblem(problem)
    from gdino.text import PromptError, chunk_caption, get_tokenizer, normalize_caption

    tokenizer = tokenizer or get_tokenizer()
    caption = normalize_caption(prompt)
    tokens = len(tokenizer(caption)["input_ids"])
    if tokens > max_tokens:
        raise PromptProblem(f"the prompt has {tokens} tokens, more than model.max_prompt_tokens = {max_tokens}; "
                            "shorten it or raise the limit")
    try:
        chunk_caption(caption, 256, tokenizer)
    except PromptError as exc:
        raise PromptProblem(str(exc)) from None
