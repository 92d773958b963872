"""Test-only oracle of the SepLLM cache policy: an independent Python implementation, written from
the paper and the reference code (SEPLLM.md §1, §4-§6), that the tests check the C core's one policy
(native/src/se-kv-cache.c, seen through contexts and through sepedge.cache_plan) against. Nothing
outside tests/ uses it; the package's torch reference follows the native plans instead.

- `sepllm_mask`: training-free SepLLM as a mask over full attention.
- `StreamingCache` and `stream`: the physical caches of the streaming references (StreamingLLM,
  Streaming-SepLLM): pre-RoPE keys re-rotated at their slots in the cache on every step.
- `views`: per token, what it attends to under each kv_mode, as (token, position, region,
  distance) in cache order, with distance = query position - key position as RoPE sees them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sepllm_mask(is_sep: Tensor, n_init: int, n_sep: int, n_local: int) -> Tensor:
    """Training-free SepLLM (SEPLLM.md §1): query i attends to key j <= i when j is initial, j is in
    the window of the last n_local tokens (i included), or j is a separator; with n_sep > 0, only the
    newest n_sep separators that left the window count. is_sep: (T,) bool -> (T, T) bool."""
    T = len(is_sep)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    causal, initial, window = j <= i, j < n_init, j > i - n_local
    sep = is_sep[None, :] & ~initial & causal
    if n_sep > 0:
        left = sep & ~window
        newer = left.flip(-1).cumsum(-1).flip(-1)  # separators that left, at or after j
        sep = (sep & window) | (left & (newer <= n_sep))
    return causal & (initial | window | sep)


class StreamingCache:
    """The physical cache of the streaming references (StreamingLLM, Streaming-SepLLM): pre-RoPE
    keys and values in cache order [initial | separators | recent], one token admitted at a time.

    mode "streamingllm": the initial tokens and the last n_local tokens (the new one included).
    mode "sepllm-stream": when a token arrives and the cache holds n_cache entries, the past window
    (all recent entries but the newest n_local - 1) keeps only its separators, appended to the
    separator region, which keeps its newest n_sep (0 = all). This is the reference's compression
    after a token at len > cache_size, with cache_size = n_cache - 1 and local_size = n_local - 1.

    mode "sepllm-slide" / "sepllm-runs" (issue J's variants): the window of the last n_local tokens
    slides every token as StreamingLLM's; a separator leaving it is appended to the separator
    region, which keeps its newest n_sep. sepllm-runs skips a separator whose next token is a
    separator too (the run's last one stands for it).
    """

    def __init__(self, mode: str, is_sep, n_init: int, n_sep: int, n_local: int, n_cache: int):
        if mode not in ("streamingllm", "sepllm-stream", "sepllm-slide", "sepllm-runs"):
            raise ValueError(f"unknown streaming mode {mode!r}")
        self.mode, self.is_sep = mode, set(int(t) for t in is_sep)
        self.n_init, self.n_sep, self.n_local, self.n_cache = n_init, n_sep, n_local, n_cache
        self.entries: list[tuple[int, int, str]] = []  # (token, position in the text, region)
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.n_seen = 0
        self.n_compressions = 0

    def _keep(self, idx: list[int]) -> None:
        self.entries = [self.entries[i] for i in idx]
        for layer in self.k:
            self.k[layer], self.v[layer] = self.k[layer][idx], self.v[layer][idx]

    def admit(self, token: int) -> None:
        idx = {r: [i for i, e in enumerate(self.entries) if e[2] == r] for r in ("init", "sep", "recent")}
        if self.mode == "streamingllm":
            self._keep(idx["init"] + idx["recent"][max(0, len(idx["recent"]) - (self.n_local - 1)):])
        elif self.mode in ("sepllm-slide", "sepllm-runs"):
            n_out = max(0, len(idx["recent"]) - (self.n_local - 1))  # they leave the window now
            out, keep = idx["recent"][:n_out], idx["recent"][n_out:]
            seps = list(idx["sep"])
            for i in out:
                tok, pos, _ = self.entries[i]
                nxt = [e for e in self.entries if e[1] == pos + 1]
                runs = self.mode == "sepllm-runs" and nxt and nxt[0][0] in self.is_sep
                if tok in self.is_sep and not runs:
                    seps = (seps + [i])[-self.n_sep:]
            for i in seps:
                self.entries[i] = (*self.entries[i][:2], "sep")
            self._keep(idx["init"] + seps + keep)
        elif len(self.entries) >= self.n_cache:
            self.n_compressions += 1
            local = max(0, len(idx["recent"]) - (self.n_local - 1))
            past, keep = idx["recent"][:local], idx["recent"][local:]
            seps = idx["sep"] + [i for i in past if self.entries[i][0] in self.is_sep]
            if self.n_sep > 0:
                seps = seps[-self.n_sep:]
            for i in seps:
                self.entries[i] = (*self.entries[i][:2], "sep")
            self._keep(idx["init"] + seps + keep)
            if len(self.entries) >= self.n_cache:
                raise RuntimeError("the cache is full of separators")
        region = "init" if self.n_seen < self.n_init else "recent"
        self.entries.append((token, self.n_seen, region))
        self.n_seen += 1

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this token's key and value (its entry is already admitted) and return the layer's."""
        if layer in self.k:
            self.k[layer], self.v[layer] = torch.cat([self.k[layer], k]), torch.cat([self.v[layer], v])
        else:
            self.k[layer], self.v[layer] = k, v
        assert len(self.k[layer]) == len(self.entries)
        return self.k[layer], self.v[layer]


@torch.no_grad()
def forward_step(model, token: int, cache: StreamingCache) -> Tensor:
    """One token of a sepedge.reference.Transformer through a streaming cache: the cache makes room
    (evicting or compressing), takes the token's pre-RoPE key and value, and every key is rotated at
    its slot in the cache, the query at the last slot (positions within the cache). (n_vocab,)"""
    a, w = model.args, model.w
    cache.admit(token)
    x = w["token_embd.weight"][torch.tensor([token])]
    for i in range(a.n_layer):
        blk = f"blk.{i}"
        h = model.rms_norm(x, w[f"{blk}.attn_norm.weight"])
        q = model.project(h, f"{blk}.attn_q").view(1, a.n_head, a.head_dim)
        k = model.project(h, f"{blk}.attn_k").view(1, a.n_head_kv, a.head_dim)
        v = model.project(h, f"{blk}.attn_v").view(1, a.n_head_kv, a.head_dim)
        keys, values = cache.store(i, k, v)
        slots = torch.arange(len(keys))
        q = model.rope(q, slots[-1:])
        att = model.attention(q, model.rope(keys, slots), values, torch.ones(1, len(keys), dtype=torch.bool))
        x = x + model.project(att.reshape(1, -1), f"{blk}.attn_output")
        h = model.rms_norm(x, w[f"{blk}.ffn_norm.weight"])
        x = x + model.project(F.silu(model.project(h, f"{blk}.ffn_gate")) * model.project(h, f"{blk}.ffn_up"),
                              f"{blk}.ffn_down")
    return model.project(model.rms_norm(x, w["output_norm.weight"]), "output")[0]


@torch.no_grad()
def stream(model, tokens: list[int], cache: StreamingCache) -> Tensor:
    """Logits of every token fed one at a time through `cache`: (len(tokens), n_vocab)."""
    return torch.stack([forward_step(model, t, cache) for t in tokens])


def views(mode: str, tokens: list[int], separators, n_init: int, n_sep: int, n_local: int, n_cache: int):
    """Per token, in order: (attended, compressed). attended lists (token, position, region,
    distance) in cache order [initial | separators | recent]; compressed says whether the cache
    was compressed when the token arrived (sepllm-stream)."""
    seps = set(int(s) for s in separators)
    if mode in ("sepllm-slide", "sepllm-runs"):
        yield from _slide_views(mode, tokens, seps, n_init, n_sep, n_local)
        return
    if mode in ("streamingllm", "sepllm-stream"):
        cache = StreamingCache(mode, seps, n_init, n_sep, n_local, n_cache)
        for t in tokens:
            before = cache.n_compressions
            cache.admit(t)
            last = len(cache.entries) - 1
            yield ([(tok, pos, region, last - slot) for slot, (tok, pos, region) in enumerate(cache.entries)],
                   cache.n_compressions > before)
        return
    if mode not in ("full", "sepllm"):
        raise ValueError(f"unknown mode {mode!r}")
    left: list[int] = []  # sepllm: separators that left the window, oldest first
    for i, t in enumerate(tokens):
        if mode == "full":
            yield [(tokens[j], j, "init" if j < n_init else "recent", i - j) for j in range(i + 1)], False
            continue
        edge = i - n_local  # positions <= edge have left the window of query i
        if edge >= n_init and tokens[edge] in seps:
            left.append(edge)
        kept = left[-n_sep:] if n_sep else left
        init = [j for j in range(min(n_init, i + 1))]
        window = [j for j in range(max(n_init, edge + 1), i + 1)]
        yield ([(tokens[j], j, "init", i - j) for j in init] + [(tokens[j], j, "sep", i - j) for j in kept] +
               [(tokens[j], j, "recent", i - j) for j in window]), False


def _slide_views(mode: str, tokens: list[int], seps: set[int], n_init: int, n_sep: int, n_local: int):
    """sepllm-slide / sepllm-runs by positions: query i sees the initial tokens, the newest n_sep
    separators that left its window (for sepllm-runs, those whose next token is no separator, or
    was not yet seen when they left), and the window (i - n_local, i]. The window keeps original
    distances; the separators, then the initial tokens, sit in the slots right before it."""
    left: list[int] = []
    for i in range(len(tokens)):
        edge = i - n_local  # leaves the window of query i
        if edge >= n_init and tokens[edge] in seps:
            if not (mode == "sepllm-runs" and edge + 1 < i and tokens[edge + 1] in seps):
                left.append(edge)
        kept = left[-n_sep:]
        init = list(range(min(n_init, i + 1)))
        window = list(range(max(n_init, edge + 1), i + 1))
        first = window[0] if window else i + 1  # no window: the query is an initial token itself
        before = [(j, "init") for j in init] + [(j, "sep") for j in kept]
        slot0 = first - len(before)
        yield ([(tokens[j], j, region, i - (slot0 + k)) for k, (j, region) in enumerate(before)] +
               [(tokens[j], j, "recent", i - j) for j in window]), False
