"""The three models (two-tower retrieval, BST-style ranker, search) and their serving graphs.

Why separate serving graphs: training works on any number of candidates and uses sampled/full softmax,
while the exported graphs have a fixed contract (only the batch axis dynamic, padded sequences, constant
TopK K, unknown ids clamped to 0 inside the graph) so that ONNX Runtime and TensorRT can run them as is.
Everything is plain nn.Embedding + masked sums + matmuls (no EmbeddingBag, no data-dependent shapes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HISTORY_LEN = 50
EXCLUDE_LEN = 1000
RETRIEVAL_K = 100
SEARCH_K = 20
#: Additive mask value: large enough to switch a logit off, small enough for FP16 (max 65504).
MASK_VALUE = -1.0e4


def clamp_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Map ids outside 1..n to 0 (padding / unknown), so bad ids never index out of a table."""
    ok = (ids >= 1) & (ids <= n)
    return torch.where(ok, ids, torch.zeros_like(ids))


def masked_mean(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over axis 1 of ``emb`` (B, L, D) where ``mask`` (B, L) is true; zeros when nothing is set."""
    m = mask.to(emb.dtype).unsqueeze(-1)
    return (emb * m).sum(1) / m.sum(1).clamp(min=1.0)


def masked_mean_last(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the second-to-last axis of ``emb`` (..., W, D) where ``mask`` (..., W) is true."""
    m = mask.to(emb.dtype).unsqueeze(-1)
    return (emb * m).sum(-2) / m.sum(-2).clamp(min=1.0)


# --------------------------------------------------------------------------------------------- retrieval


class TwoTower(nn.Module):
    """User tower f(user embedding, mean of history, mean of the last 5) . item vector + item bias.

    Items are embedded as id embedding + category embedding (the category generalises to items with
    few events). Row 0 of the user table is the learned "unknown user" (training swaps ~15% of ids to 0),
    so cold start falls back to the history (category taste) or, with neither, to the popularity bias.
    """

    def __init__(self, n_users: int, n_items: int, item_category: torch.Tensor, dim: int = 64) -> None:
        super().__init__()
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.register_buffer("item_category", item_category.long().clone())  # (n_items + 1,)
        n_cat = int(item_category.max()) + 1
        self.user_emb = nn.Embedding(n_users + 1, dim)
        self.hist_emb = nn.Embedding(n_items + 1, dim)
        self.hist_cat = nn.Embedding(n_cat, dim)
        self.item_emb = nn.Embedding(n_items + 1, dim)
        self.item_cat = nn.Embedding(n_cat, dim)
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1))
        self.mlp = nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        for e in (self.user_emb, self.hist_emb, self.hist_cat, self.item_emb, self.item_cat):
            nn.init.normal_(e.weight, std=0.05)

    def user_vec(self, user: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """user (B,), history (B, L) right-aligned -> (B, D)."""
        user = clamp_ids(user, self.n_users)
        history = clamp_ids(history, self.n_items)
        mask = history > 0
        h = self.hist_emb(history) + self.hist_cat(self.item_category[history])
        recent = masked_mean(h[:, -5:], mask[:, -5:])
        return self.mlp(torch.cat([self.user_emb(user), masked_mean(h, mask), recent], dim=-1))

    def item_matrix(self) -> torch.Tensor:
        """(n_items + 1, D) item tower output (a constant of the serving graph)."""
        return self.item_emb.weight + self.item_cat(self.item_category)

    def logits(self, uvec: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item (B, n_items + 1); column 0 is padding and must be masked by the caller."""
        items = self.item_matrix() if items is None else items
        return uvec @ items.t() + self.item_bias


class RetrievalGraph(nn.Module):
    """Serving graph: (user_id [B,1], history [B,50], exclude [B,1000]) -> top-100 ids and scores."""

    def __init__(self, model: TwoTower, k: int = RETRIEVAL_K) -> None:
        super().__init__()
        self.model, self.k = model, k
        with torch.no_grad():
            self.register_buffer("items", model.item_matrix().detach().clone())

    def forward(
        self, user_id: torch.Tensor, history: torch.Tensor, exclude: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.model.logits(self.model.user_vec(user_id[:, 0], history), self.items)
        # item 0 and every excluded id -> -inf; out-of-range exclude ids become 0 (already -inf).
        excl = torch.cat([torch.zeros_like(user_id), clamp_ids(exclude, self.model.n_items)], dim=1)
        scores = scores.scatter(1, excl, torch.full_like(excl, float("-inf"), dtype=scores.dtype))
        top_scores, top_ids = torch.topk(scores, self.k, dim=1)
        return top_ids, top_scores


# ------------------------------------------------------------------------------------------------ ranker


class _Attention(nn.Module):
    """Multi-head attention written with matmuls (exports to plain ONNX ops, unlike the fused kernels)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.h, self.dh = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, dh)
        return x.reshape(x.shape[0], x.shape[1], self.h, self.dh).transpose(1, 2)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor, self_key: bool = False
    ) -> torch.Tensor:
        """query (B,Q,D) attends over keys (B,K,D) (key_mask (B,K) true = real); with ``self_key`` each
        query also attends to itself (the candidate token of BST), so no row is ever fully masked."""
        b, nq, d = query.shape
        q, k, v = self._split(self.q(query)), self._split(self.k(keys)), self._split(self.v(keys))
        att = q @ k.transpose(-1, -2) / math.sqrt(self.dh)  # (B, H, Q, K)
        att = torch.where(key_mask[:, None, None, :], att, torch.full_like(att, MASK_VALUE))
        if self_key:
            ks, vs = self._split(self.k(query)), self._split(self.v(query))
            self_att = (q * ks).sum(-1, keepdim=True) / math.sqrt(self.dh)  # (B, H, Q, 1)
            w = torch.softmax(torch.cat([att, self_att], dim=-1), dim=-1)
            out = w[..., :-1] @ v + w[..., -1:] * vs
        else:
            out = torch.softmax(att, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, nq, d))


class BSTRanker(nn.Module):
    """Behaviour Sequence Transformer: history self-attention, then each candidate attends to the encoded
    history plus itself (candidate at its own 'target' position), then an MLP.

    Why the candidate attends but is not attended to: the history encoding is then shared by all 100
    candidates of a request (100x less work than re-encoding 51 tokens per candidate) while each score
    still comes from a transformer over (behaviour sequence + that candidate).
    """

    def __init__(
        self,
        n_items: int,
        item_category: torch.Tensor,
        item_words: torch.Tensor,
        dim: int = 32,
        heads: int = 2,
        hist_len: int = HISTORY_LEN,
    ) -> None:
        super().__init__()
        self.n_items, self.hist_len = n_items, hist_len
        self.register_buffer("item_category", item_category.long().clone())  # (n_items + 1,)
        self.register_buffer("item_words", item_words.long().clone())  # (n_items + 1, W) title-word ids
        self.item_emb = nn.Embedding(n_items + 1, dim)
        self.cat_emb = nn.Embedding(int(item_category.max()) + 1, dim)
        self.word_emb = nn.Embedding(int(item_words.max()) + 1, dim)
        for e in (self.cat_emb, self.word_emb):
            nn.init.normal_(e.weight, std=0.05)
        self.pos_emb = nn.Embedding(hist_len + 1, dim)  # positions 0..L-1 history (L-1 = newest), L = candidate
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1))
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.pos_emb.weight, std=0.05)
        self.self_att = _Attention(dim, heads)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.target_att = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(5 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def item_table(self) -> torch.Tensor:
        """(n_items + 1, D): id + category + mean title-word embeddings (BST's item side features:
        colour, brand...). Computed once per batch, and a constant of the serving graph."""
        w = self.item_words
        return self.item_emb.weight + self.cat_emb(self.item_category) + masked_mean_last(self.word_emb(w), w > 0)

    def forward(
        self, history: torch.Tensor, candidates: torch.Tensor, table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """history (B, L), candidates (B, C) -> logits (B, C)."""
        table = self.item_table() if table is None else table
        history = clamp_ids(history, self.n_items)
        candidates = clamp_ids(candidates, self.n_items)
        mask = history > 0
        pos = self.pos_emb.weight[: self.hist_len]
        if history.shape[1] != self.hist_len:  # training trims all-padding columns (right-aligned)
            pos = pos[self.hist_len - history.shape[1] :]
        x = F.embedding(history, table) + pos
        x = self.ln1(x + self.self_att(x, x, mask))
        x = self.ln2(x + self.ffn(x))
        c_raw = F.embedding(candidates, table)
        c = c_raw + self.pos_emb.weight[self.hist_len]
        a = self.ln3(c + self.target_att(c, x, mask, self_key=True))
        pooled = masked_mean(x, mask).unsqueeze(1).expand_as(c_raw)
        last = x[:, -1:, :].expand_as(c_raw)
        feats = torch.cat([c_raw, a, c_raw * pooled, c_raw * last, a * pooled], dim=-1)
        b, n = candidates.shape
        logit = self.mlp(feats.reshape(b * n, -1)).reshape(b, n)
        return logit + self.item_bias[candidates]


class RankerGraph(nn.Module):
    """Serving graph: (history [B,50], candidates [B,100]) -> probability of interaction [B,100]."""

    def __init__(self, model: BSTRanker) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.register_buffer("table", model.item_table().detach().clone())

    def forward(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(history, candidates, self.table))


# ------------------------------------------------------------------------------------------------ search


class SearchModel(nn.Module):
    """Query tower: masked mean of token embeddings; item tower: mean of the item's title-token
    embeddings (the same table, which is what makes lexical matches strong) plus an id embedding; cosine
    score x learned scale + popularity bias + light personalisation: a learned weight x the user's
    category lift (log share of the user's training events in the item's category over the global share;
    user 0 and users without events have 0 everywhere, i.e. no personalisation).

    Hashed token buckets are mapped to a compact vocabulary (the buckets that occur in titles; 0 = a word
    no title has, which is ignored), so training touches a few hundred rows instead of 50k.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        title_tokens: torch.Tensor,
        num_buckets: int,
        item_category: torch.Tensor,
        user_category_lift: torch.Tensor,
        dim: int = 64,
        log_popularity: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.register_buffer("item_category", item_category.long().clone())  # (n_items + 1,)
        self.register_buffer("user_lift", user_category_lift.float().clone())  # (n_users + 1, n_cat + 1)
        buckets = torch.unique(title_tokens[title_tokens > 0])
        b2w = torch.zeros(num_buckets, dtype=torch.long)
        b2w[buckets] = torch.arange(1, len(buckets) + 1)
        self.register_buffer("bucket_to_word", b2w)  # (num_buckets,) -> compact word id, 0 = unknown
        self.register_buffer("title_words", b2w[title_tokens.long()])  # (n_items + 1, T)
        self.word_emb = nn.Embedding(len(buckets) + 1, dim, padding_idx=0)
        nn.init.normal_(self.word_emb.weight, std=0.3)
        with torch.no_grad():
            self.word_emb.weight[0].zero_()
        self.query_proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.query_proj.weight.copy_(torch.eye(dim))
            self.query_proj.bias.zero_()
        self.id_emb = nn.Embedding(n_items + 1, dim)
        nn.init.normal_(self.id_emb.weight, std=0.01)
        bias = torch.zeros(n_items + 1) if log_popularity is None else log_popularity - log_popularity[1:].mean()
        self.item_bias = nn.Parameter(bias.float().clone())
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.lift_weight = nn.Parameter(torch.tensor(0.5))

    def item_matrix(self) -> torch.Tensor:
        w = self.title_words
        return F.normalize(masked_mean(self.word_emb(w), w > 0) + self.id_emb.weight, dim=-1)

    def query_vec(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) hashed buckets; out-of-range buckets count as unknown words."""
        w = self.bucket_to_word[clamp_ids(tokens, self.bucket_to_word.shape[0] - 1)]
        q = masked_mean(self.word_emb(w), w > 0)
        return F.normalize(self.query_proj(q), dim=-1)

    def scores(self, tokens: torch.Tensor, user: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_items + 1) scores; ``items`` may be the precomputed item tower (serving graph constant)."""
        items = self.item_matrix() if items is None else items
        user = clamp_ids(user, self.n_users)
        s = self.log_scale.exp() * (self.query_vec(tokens) @ items.t()) + self.item_bias
        lift = self.user_lift[user][:, self.item_category]  # (B, n_items + 1)
        return s + self.lift_weight * lift


class SearchGraph(nn.Module):
    """Serving graph: (tokens [B,16], user_id [B,1]) -> top-20 item ids and scores, item 0 never returned.
    The item tower is evaluated once here and stored as a constant."""

    def __init__(self, model: SearchModel, k: int = SEARCH_K) -> None:
        super().__init__()
        self.model, self.k = model, k
        with torch.no_grad():
            self.register_buffer("items", model.item_matrix().detach().clone())
            pad = torch.zeros(model.n_items + 1)
            pad[0] = float("-inf")
            self.register_buffer("pad_mask", pad)

    def forward(self, tokens: torch.Tensor, user_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.model.scores(tokens, user_id[:, 0], self.items) + self.pad_mask
        top_scores, top_ids = torch.topk(s, self.k, dim=1)
        return top_ids, top_scores
