"""JSON mode (response_format {"type": "json_object"}): generation constrained to one JSON object.

`JSONPrefix` recognizes prefixes of JSON text (RFC 8259) one character at a time. At every step of a
JSON-mode generation the most likely tokens are tried in order of their logits and the first
`n_keep` whose text keeps the output a JSON prefix stay; every other token is masked. So sampling
(top-k, top-p, temperature) works on the valid candidates, which are nearly always among the best
ones, while a full scan of the vocabulary is only needed when few tokens fit (after a key, say).
Once the object is complete only the end-of-generation tokens remain.
"""

from __future__ import annotations

import numpy as np

WS = " \t\n\r"
MAX_WS = 16  # consecutive whitespace outside strings (llama.cpp's JSON grammar bounds it too)
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}


class JSONPrefix:
    """A pushdown recognizer: `feed(ch)` returns False (changing nothing useful) if `ch` cannot
    continue the text; `complete` is True once a whole top-level object has been read."""

    __slots__ = ("stack", "state", "rest", "n_ws")

    def __init__(self):
        self.stack: list[str] = []   # "obj" / "arr" for each open container
        self.state = "top"           # what may come next (see feed)
        self.rest = ""               # the rest of a literal, or the hex digits left of a \\u escape
        self.n_ws = 0

    def copy(self) -> JSONPrefix:
        c = JSONPrefix.__new__(JSONPrefix)
        c.stack, c.state, c.rest, c.n_ws = list(self.stack), self.state, self.rest, self.n_ws
        return c

    @property
    def complete(self) -> bool:
        return self.state == "done"

    def accepts(self, text: str) -> bool:
        """Whether `text` can follow (the recognizer is left unchanged)."""
        c = self.copy()
        return all(c.feed(ch) for ch in text)

    def first_chars(self) -> str | None:
        """The characters that can come next (None: too many to list, inside strings and numbers)."""
        s = self.state
        ws = WS if self.n_ws < MAX_WS else ""
        value = '{["-0123456789tfn'
        return {"top": ws + "{", "value": ws + value, "obj_first": ws + '"}', "obj_key": ws + '"', "colon": ws + ":",
                "obj_next": ws + ",}", "arr_next": ws + ",]", "arr_first": ws + value + "]", "done": "",
                "esc": '"\\/bfnrtu', "esc_key": '"\\/bfnrtu', "u": "0123456789abcdefABCDEF",
                "u_key": "0123456789abcdefABCDEF", "literal": self.rest[:1]}.get(s)

    def _value_done(self) -> None:
        self.state = "done" if not self.stack else ("obj_next" if self.stack[-1] == "obj" else "arr_next")

    def _start_value(self, ch: str) -> bool:
        if ch == "{":
            self.stack.append("obj")
            self.state = "obj_first"
        elif ch == "[":
            self.stack.append("arr")
            self.state = "arr_first"
        elif ch == '"':
            self.state = "string"
        elif ch == "-":
            self.state = "n_sign"
        elif ch == "0":
            self.state = "n_zero"
        elif ch.isdigit() and ch.isascii():
            self.state = "n_int"
        elif ch in LITERALS:
            self.state, self.rest = "literal", LITERALS[ch]
        else:
            return False
        return True

    def _number(self, ch: str) -> bool | None:
        """A character in a number state: True/False, or None when the number ended before it."""
        s, digit = self.state, ch.isascii() and ch.isdigit()
        nxt = {"n_sign": {"digit": "n_int", "0": "n_zero"}, "n_zero": {".": "n_dot", "e": "n_e"},
               "n_int": {"digit": "n_int", ".": "n_dot", "e": "n_e"}, "n_dot": {"digit": "n_frac"},
               "n_frac": {"digit": "n_frac", "e": "n_e"}, "n_e": {"digit": "n_exp", "sign": "n_esign"},
               "n_esign": {"digit": "n_exp"}, "n_exp": {"digit": "n_exp"}}[s]
        key = "0" if ch == "0" and "0" in nxt else "digit" if digit else "e" if ch in "eE" else \
            "sign" if ch in "+-" else ch
        if key in nxt:
            self.state = nxt[key]
            return True
        if s in ("n_zero", "n_int", "n_frac", "n_exp"):  # a complete number: ch belongs to what follows
            return None
        return False

    def feed(self, ch: str) -> bool:
        s = self.state
        if s == "string" or s == "key":
            if ch == '"':
                if s == "key":
                    self.state = "colon"
                else:
                    self._value_done()
            elif ch == "\\":
                self.state = "esc_key" if s == "key" else "esc"
            elif ord(ch) < 0x20:
                return False
            return True
        if s in ("esc", "esc_key"):
            back = "key" if s == "esc_key" else "string"
            if ch in '"\\/bfnrt':
                self.state = back
            elif ch == "u":
                self.state, self.rest = ("u_key" if s == "esc_key" else "u"), "xxxx"
            else:
                return False
            return True
        if s in ("u", "u_key"):
            if ch not in "0123456789abcdefABCDEF":
                return False
            self.rest = self.rest[1:]
            if not self.rest:
                self.state = "key" if s == "u_key" else "string"
            return True
        if s == "literal":
            if ch != self.rest[0]:
                return False
            self.rest = self.rest[1:]
            if not self.rest:
                self._value_done()
            return True
        if s.startswith("n_"):
            r = self._number(ch)
            if r is not None:
                return r
            self._value_done()
            return self.feed(ch)
        if ch in WS:  # between tokens
            self.n_ws += 1
            return self.n_ws <= MAX_WS
        self.n_ws = 0
        if s == "top":
            return ch == "{" and self._start_value(ch)
        if s == "value":
            return self._start_value(ch)
        if s in ("obj_first", "obj_key"):
            if ch == '"':
                self.state = "key"
                return True
            if ch == "}" and s == "obj_first":
                self.stack.pop()
                self._value_done()
                return True
            return False
        if s == "colon":
            if ch == ":":
                self.state = "value"
                return True
            return False
        if s in ("obj_next", "arr_next"):
            close = "}" if s == "obj_next" else "]"
            if ch == ",":
                self.state = "obj_key" if s == "obj_next" else "value"
                return True
            if ch == close:
                self.stack.pop()
                self._value_done()
                return True
            return False
        if s == "arr_first":
            if ch == "]":
                self.stack.pop()
                self._value_done()
                return True
            return self._start_value(ch)
        return False  # "done": nothing but the end


class JSONConstraint:
    """Masks the logits of one generation so that its text stays a prefix of a JSON object."""

    def __init__(self, token_texts: list[str | None], eog_ids, n_keep: int = 40):
        self.texts, self.eog, self.n_keep = token_texts, frozenset(eog_ids), n_keep
        # each token's first character, to narrow the candidates before trying them one by one
        self.first = np.array([ord(t[0]) if t else -1 for t in token_texts], dtype=np.int32)
        self.prefix = JSONPrefix()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        keep: list[int] = []
        if self.prefix.complete:
            keep = sorted(t for t in self.eog if np.isfinite(logits[t]))
        else:
            chars = self.prefix.first_chars()
            if chars is None:
                cand = np.nonzero(self.first >= 0)[0]
            else:
                cand = np.nonzero(np.isin(self.first, np.array([ord(c) for c in chars] or [-2], dtype=np.int32)))[0]
            cand = cand[np.argsort(-logits[cand], kind="stable")]
            for t, v in zip(cand.tolist(), logits[cand].tolist()):
                if v == -np.inf:
                    break
                if self.prefix.accepts(self.texts[t]):
                    keep.append(t)
                    if len(keep) >= self.n_keep:
                        break
        if not keep:  # nothing fits (or the object is done and no end token is left): end here
            keep = sorted(self.eog)
        out = np.full_like(logits, -np.inf)
        out[keep] = logits[keep]
        return out

    def accept(self, token: int) -> None:
        for ch in self.texts[token] or "":
            self.prefix.feed(ch)


def token_texts(tokenizer) -> list[str | None]:
    """Each token's text, None for control tokens and for bytes that are not whole UTF-8 characters."""
    out: list[str | None] = []
    for i, b in enumerate(tokenizer.token_bytes):
        if tokenizer.is_control[i]:
            out.append(None)
            continue
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
    return out
