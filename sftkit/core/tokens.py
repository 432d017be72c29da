"""Tokens as readable strings: byte-level pieces decoded, special tokens marked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class TokenPiece:
    id: int
    text: str  # what the token adds to the decoded text
    special: bool


def readable_tokens(tokenizer, ids: Sequence[int], window: int = 4) -> list[TokenPiece]:
    """One piece per id: what decoding that token adds to the text before it.

    Decoding with a few tokens of left context keeps leading spaces (sentencepiece) and
    shows a multi-byte character on the token that completes it, not as replacement marks.
    Two short decodes per token, so long prompts stay cheap.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [int(t) for t in ids]
    pieces: list[TokenPiece] = []
    floor = 0  # no context from before the last special token
    for i, tid in enumerate(ids):
        if tid in special:
            pieces.append(TokenPiece(tid, tokenizer.decode([tid]), True))
            floor = i + 1
            continue
        j = max(floor, i - window)
        before = tokenizer.decode(ids[j:i]) if i > j else ""
        now = tokenizer.decode(ids[j:i + 1])
        if now.endswith("\ufffd"):  # an incomplete character: the next token completes it
            text = ""
        elif now.startswith(before.rstrip("\ufffd")):
            text = now[len(before.rstrip("\ufffd")):]
        else:
            text = tokenizer.decode([tid])
        pieces.append(TokenPiece(tid, text, False))
    return pieces
