"""Query/title tokenizer shared by training (build/) and serving (search_pre).

It lives next to the served model so the Triton Python model and the NGC container need nothing
outside the model repository; build/ imports this very file, so training and serving cannot drift.
"""

from __future__ import annotations

import re
import zlib

#: Hash buckets for tokens; 0 is reserved for padding.
NUM_BUCKETS = 50_000
#: Tokens per query seen by the model (longer queries are truncated after validation).
MAX_TOKENS = 16
#: Hard limit on the UTF-8 length of a query; longer ones are rejected.
MAX_QUERY_BYTES = 256

_TOKEN_RE = re.compile(r"[^\W_]+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits of any script)."""
    return _TOKEN_RE.findall(text.lower())


def hash_token(token: str) -> int:
    """Stable bucket in [1, NUM_BUCKETS) (crc32, so it is identical in every process)."""
    return 1 + zlib.crc32(token.encode("utf-8")) % (NUM_BUCKETS - 1)


def encode(text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Hashed token ids, right-padded with 0 to ``max_tokens``."""
    ids = [hash_token(t) for t in tokenize(text)][:max_tokens]
    return ids + [0] * (max_tokens - len(ids))


def query_tokens(raw: bytes) -> list[int]:
    """Token ids of one raw query as search_pre serves it; ValueError naming the input and the rule."""
    if len(raw) == 0 or not raw.strip():
        raise ValueError("input 'query' must not be empty")
    if len(raw) > MAX_QUERY_BYTES:
        raise ValueError(f"input 'query' is {len(raw)} bytes; the limit is {MAX_QUERY_BYTES} UTF-8 bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("input 'query' must be valid UTF-8") from None
    ids = encode(text)
    if not any(ids):
        raise ValueError("input 'query' must contain at least one word (letters or digits)")
    return ids


def search_inputs(queries: list[bytes], users: list[int] | None) -> tuple[list[list[int]], list[list[int]]]:
    """What search_pre computes for a batch: (tokens [B][MAX_TOKENS], user_idx [B][1]); ``users`` None =
    anonymous (0). ValueError naming the input and the rule. Plain lists: training imports this file too."""
    tokens = [query_tokens(q) for q in queries]
    uids = [0] * len(queries) if users is None else [int(u) for u in users]
    if uids and min(uids) < 0:
        raise ValueError(f"input 'user_id' must be >= 0, got {min(uids)}")
    return tokens, [[u] for u in uids]
