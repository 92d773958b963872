"""The SepLLM cache policy on its own, for backends that keep K and V themselves (the torch
reference, Triton): a thin owning wrapper over `se_cache_policy` (native/include/sepedge.h).

The C core is the one implementation of the policy; a context runs the same code, so a policy fed
the tokens a context was fed holds the same cells.

    policy = CachePolicy("sepllm-stream", separators=[13, 11], n_vocab=1000,
                         n_init=4, n_sep=64, n_local=256, n_cache=800)
    for plan in policy.plan(tokens):      # one forward pass per plan
        ...  # write K/V of the new tokens to plan.cells, rotated at plan.positions; query t
             # attends plan.live_cells[plan.mask[t]], keys rotated further by plan.live_deltas
             # (+ t * plan.live_steps with slide_in_pass=True: passes that slide the window)

Sizes: sepedge's n_cache and n_local count the cell of the token being evaluated, so a streaming
run of the reference code (Streaming-SepLLM, StreamingLLM) with cache_size c and local_size w is
n_cache = c + 1, n_local = w + 1 here (the header explains why).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import sepllm
from ._ffi import ffi, lib
from ._native import KV_MODES, Model, _Handle, _int_arg
from .errors import InvalidArgumentError, check

REGION_NAMES = {lib.SE_REGION_INIT: "init", lib.SE_REGION_SEP: "sep", lib.SE_REGION_RECENT: "recent"}


@dataclass(frozen=True)
class Plan:
    """One forward pass. Arrays are int32 (mask: bool) and belong to the plan."""
    cells: np.ndarray           # (n_tokens,) the cell each new token's K and V are written to
    positions: np.ndarray       # (n_tokens,) original positions: the new keys and queries are rotated with them
    live_cells: np.ndarray      # (n_live,) cells the pass attends to, cache order [initial | separators | recent]
    live_positions: np.ndarray  # (n_live,) their original positions
    live_deltas: np.ndarray     # (n_live,) extra rotation when read: the key acts at position + delta
    live_regions: np.ndarray    # (n_live,) lib.SE_REGION_INIT / _SEP / _RECENT
    live_steps: np.ndarray      # (n_live,) 0 or 1: new token t reads the key at position + delta + t * step
    mask: np.ndarray | None     # (n_tokens, n_live) bool: new token t attends live cell i
    n_visible: int              # sum over the new tokens of the cells each one attends to
    n_compressions: int         # sepllm-stream compressions in this step
    evicted_cells: np.ndarray   # (n_evicted,) cells given up in this step (before or after the pass)
    evicted_tokens: np.ndarray
    evicted_positions: np.ndarray
    evicted_regions: np.ndarray  # the region each one left

    @property
    def n_tokens(self) -> int:
        return len(self.cells)

    @property
    def n_live(self) -> int:
        return len(self.live_cells)


class CachePolicy(_Handle):
    """A SepLLM cache policy: sizes, kv_mode and separator set, with or without a model.

    Without a model, `separators` and `n_vocab` are required and sizes left as None take
    sepedge.sepllm.DEFAULTS; with one, None takes the model's `sepllm.*` defaults, its separator
    set and its vocabulary. `mask=False` skips the (n_tokens, n_live) masks.
    """
    _kind = "cache policy"

    def __init__(self, kv_mode: str = "sepllm-stream", *, model: Model | None = None, separators=None,
                 n_init: int | None = None, n_sep: int | None = None, n_local: int | None = None,
                 n_cache: int | None = None, n_ctx: int = 0, n_batch: int = 512, n_vocab: int | None = None,
                 mask: bool = True, slide_in_pass: bool = False):
        if kv_mode not in KV_MODES:
            raise InvalidArgumentError(f"kv_mode must be one of {list(KV_MODES)}, got {kv_mode!r}")
        if model is not None and not isinstance(model, Model):
            raise InvalidArgumentError(f"model must be a sepedge Model or None, got {type(model).__name__}")
        params = ffi.new("se_cache_policy_params *", lib.se_cache_policy_default_params())
        params.kv_mode = KV_MODES[kv_mode]
        for name, value in (("n_init", n_init), ("n_sep", n_sep), ("n_local", n_local), ("n_cache", n_cache)):
            if value is None:  # the model's default (-1), or the package's without a model
                setattr(params, name, -1 if model is not None else sepllm.DEFAULTS[name])
            else:
                setattr(params, name, _int_arg(name, value, 0))
        params.n_ctx = _int_arg("n_ctx", n_ctx, 0)
        params.n_batch = _int_arg("n_batch", n_batch, 1)
        params.n_vocab = 0 if n_vocab is None else _int_arg("n_vocab", n_vocab, 1)
        params.slide_in_pass = bool(slide_in_pass)
        if separators is None:
            ids, n_ids = ffi.NULL, -1  # the model's set (the C core says so when there is no model)
        else:
            arr = _token_array("separators", separators)
            ids, n_ids = ffi.from_buffer("int32_t[]", arr), len(arr)
        out = ffi.new("se_cache_policy **")
        check(lib.se_cache_policy_new(model.ptr if model is not None else ffi.NULL, params, ids, n_ids, out))
        super().__init__(out[0], lib.se_cache_policy_free)
        self.model = model  # a policy made from a model keeps it alive
        info = self.info()
        self.kv_mode = kv_mode
        self.n_cells = info["n_cells"]  # the budget; a pass that slides the window may use n_spare more
        self.n_spare = info["n_spare"]
        self.n_batch = min(params.n_batch, self.n_cells)
        self._mask = bool(mask)
        n_all = self.n_cells + self.n_spare
        self._tokens_buf = {k: np.empty(self.n_batch, np.int32) for k in ("cells", "positions")}
        self._live_buf = {k: np.empty(n_all, np.int32) for k in ("cells", "positions", "deltas", "regions", "steps")}
        self._mask_buf = np.empty(self.n_batch * n_all, np.uint8) if self._mask else None
        self._plan = ffi.new("se_cache_plan *")
        p, b, lb = self._plan, self._tokens_buf, self._live_buf
        p.cells, p.positions, p.max_tokens = _ptr(b["cells"]), _ptr(b["positions"]), self.n_batch
        p.live_cells, p.live_positions = _ptr(lb["cells"]), _ptr(lb["positions"])
        p.live_deltas, p.live_regions, p.max_live = _ptr(lb["deltas"]), _ptr(lb["regions"]), n_all
        p.live_steps = _ptr(lb["steps"])
        if self._mask:
            p.mask, p.mask_size = ffi.from_buffer("uint8_t[]", self._mask_buf), len(self._mask_buf)
        else:
            p.mask, p.mask_size = ffi.NULL, 0

    def step(self, tokens) -> Plan:
        """Plan the next forward pass over the first tokens of `tokens` (at least one): as many as
        can share it. ContextFullError, with nothing changed, when not all of them would fit."""
        toks = _token_array("tokens", tokens)
        if len(toks) == 0:
            raise InvalidArgumentError("step needs at least one token")
        p = self._plan
        check(lib.se_cache_policy_step(self.ptr, ffi.from_buffer("int32_t[]", toks), len(toks), p))
        n, n_live, n_ev = p.n_tokens, p.n_live, p.n_evicted
        ev = {k: np.empty(max(n_ev, 1), np.int32) for k in ("cells", "tokens", "positions", "regions")}
        check(lib.se_cache_policy_get_evicted(self.ptr, _ptr(ev["cells"]), _ptr(ev["tokens"]), _ptr(ev["positions"]),
                                              _ptr(ev["regions"]), n_ev))
        b, lb = self._tokens_buf, self._live_buf
        mask = self._mask_buf[:n * n_live].reshape(n, n_live).astype(bool) if self._mask else None
        return Plan(cells=b["cells"][:n].copy(), positions=b["positions"][:n].copy(),
                    live_cells=lb["cells"][:n_live].copy(), live_positions=lb["positions"][:n_live].copy(),
                    live_deltas=lb["deltas"][:n_live].copy(), live_regions=lb["regions"][:n_live].copy(),
                    live_steps=lb["steps"][:n_live].copy(), mask=mask,
                    n_visible=int(p.n_visible), n_compressions=int(p.n_compressions),
                    evicted_cells=ev["cells"][:n_ev], evicted_tokens=ev["tokens"][:n_ev],
                    evicted_positions=ev["positions"][:n_ev], evicted_regions=ev["regions"][:n_ev])

    def plan(self, tokens) -> list[Plan]:
        """Every pass of `tokens`, as a backend would run them (all or nothing, as Context.decode)."""
        toks = _token_array("tokens", tokens)
        plans, s = [], 0
        while s < len(toks):
            plans.append(self.step(toks[s:]))
            s += plans[-1].n_tokens
        return plans

    def info(self) -> dict:
        """As Context.info(); kv_bytes is 0 (a policy stores no K/V)."""
        out = ffi.new("se_cache_info *")
        check(lib.se_cache_policy_get_info(self.ptr, out))
        info = {k: getattr(out, k) for k in ("n_cells", "n_init", "n_sep", "n_local", "n_live", "n_live_init",
                                             "n_live_sep", "n_live_recent", "n_seen", "n_evicted", "sum_visible",
                                             "kv_bytes", "n_spare")}
        info["kv_mode"] = next(k for k, v in KV_MODES.items() if v == out.kv_mode)
        return info

    def cells(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """As Context.cells(): token ids, original positions and regions of the live cells."""
        n = self.info()["n_live"]
        tokens, positions, regions = (np.empty(max(n, 1), np.int32) for _ in range(3))
        check(lib.se_cache_policy_get_cells(self.ptr, _ptr(tokens), _ptr(positions), _ptr(regions), n))
        return tokens[:n], positions[:n], [REGION_NAMES[r] for r in regions[:n]]

    def clear(self) -> None:
        check(lib.se_cache_policy_clear(self.ptr))

    def truncate(self, n_keep: int) -> None:
        check(lib.se_cache_policy_truncate(self.ptr, _int_arg("n_keep", n_keep, 0)))

    def keep(self, n_keep: int) -> None:
        """Make the first n_keep tokens initial ones (never evicted)."""
        check(lib.se_cache_policy_keep(self.ptr, _int_arg("n_keep", n_keep, 0)))


def _ptr(a: np.ndarray):
    return ffi.from_buffer("int32_t[]", a)


def _token_array(name: str, values) -> np.ndarray:
    """Token ids as contiguous int32, refusing what would not survive the conversion."""
    arr = np.asarray(values)
    if arr.dtype == object or arr.dtype.kind not in "iu" and arr.size:
        raise InvalidArgumentError(f"{name} must be integers, got {arr.dtype}")
    arr = arr.reshape(-1)
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise InvalidArgumentError(f"{name}: ids beyond 32 bits")
    return np.ascontiguousarray(arr, dtype=np.int32)
