"""SepLLM cache parameters: their GGUF keys and defaults.

The same names are used in C (`se_context_params`), Python (`Engine(...)`), GGUF keys (`sepllm.*`)
and CLI flags (`--n-init`, ...).
"""

from __future__ import annotations

KEY_SEPARATORS = "sepllm.separator_token_ids"

# Defaults of the paper's main streaming configuration (SEPLLM.md §4.1, §10.3): a = 4 initial
# tokens, s = 64 separators, w = 256 local tokens, c = 800 cells.
DEFAULTS = {"n_init": 4, "n_sep": 64, "n_local": 256, "n_cache": 800}
MAX_SIZE = 1 << 24  # what the loader accepts for a sepllm.* key (se-model.c)


def key(name: str) -> str:
    return f"sepllm.{name}"


def check_sizes(n_init: int, n_sep: int, n_local: int, n_cache: int) -> None:
    """The streaming layout [initial | separators | past window | local window] needs room for the
    past window: n_init + n_sep + n_local < n_cache (SEPLLM.md §4.1)."""
    for name, v in (("n_init", n_init), ("n_sep", n_sep), ("n_local", n_local), ("n_cache", n_cache)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SIZE:
            raise ValueError(f"{name} must be an integer in [0, {MAX_SIZE}], got {v!r}")
    if n_local < 1:
        raise ValueError("n_local must be at least 1 (the window includes the current token)")
    if n_init + n_sep + n_local >= n_cache:
        raise ValueError(f"n_init + n_sep + n_local must be smaller than n_cache "
                         f"({n_init} + {n_sep} + {n_local} >= {n_cache})")
