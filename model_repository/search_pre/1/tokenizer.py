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
