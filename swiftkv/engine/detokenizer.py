"""Incremental detokenization: the text each new token adds, for work proportional to the new tokens.

Re-decoding a request's whole output at every step costs O(n) per token, O(n^2) per request. Decoding only
the new token is wrong for two reasons, both handled here as vLLM does:
* tokenizers join tokens with context (SentencePiece drops a leading space at the start of a decode;
  byte-level BPE splits one character over several tokens), so each step decodes a short window that starts
  a few tokens back (`prefix_offset`) and keeps only what the window adds past the text already emitted;
* a token that ends inside a multi-byte character decodes to U+FFFD; its text waits for the next token.
"""

from __future__ import annotations

from dataclasses import dataclass

INCOMPLETE = "\ufffd"


@dataclass
class DetokenizerState:
    prefix_offset: int = 0  # window start: the tokens before it are never decoded again
    read_offset: int = 0    # tokens before it have had their text emitted


def next_text(tokenizer, token_ids: list[int], state: DetokenizerState, skip_special_tokens: bool = True) -> str:
    """The text `token_ids` (a request's output so far) adds since the last call; updates `state`."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)  # noqa: E731
    emitted = decode(token_ids[state.prefix_offset:state.read_offset])
    window = decode(token_ids[state.prefix_offset:])
    if len(window) <= len(emitted) or window.endswith(INCOMPLETE):
        return ""  # nothing printable yet (a special token, or half a character)
    state.prefix_offset, state.read_offset = state.read_offset, len(token_ids)
    return window[len(emitted):]
