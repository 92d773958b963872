"""`sepedge.Llama`: llama-cpp-python's `Llama` class as people use it, over an Engine.

    from sepedge import Llama                       # instead of: from llama_cpp import Llama
    llm = Llama(model_path="model.gguf", n_ctx=2048, n_gpu_layers=-1, seed=1337)
    out = llm("Q: Name the planets in the solar system? A: ", max_tokens=32, stop=["Q:", "\\n"], echo=True)

The constructor takes llama-cpp-python's arguments (those that mean something here; the others are
accepted and ignored, as llama-cpp-python ignores unknown keyword arguments) and sepedge's cache
keywords: kv_mode ("full" by default, as llama.cpp; "sepllm-stream" for a fixed-size cache that
never fills), n_init, n_sep, n_local, n_cache. Results have llama-cpp-python's (OpenAI's) shapes.
`Engine` stays the native API; this class only translates.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from . import chat
from ._native import Model
from .engine import DEFAULTS, Engine, EngineState
from .errors import ContextFullError, InvalidArgumentError

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed"

# Named chat formats (chat_format=...): the prompt layouts of llama-cpp-python's formats of the same
# names, as Jinja templates. None uses the model's own template (tokenizer.chat_template).
CHAT_FORMATS = {
    "chatml": chat.CHATML,
    "llama-2": ("{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
                "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
                "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
                "{% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }} [/INST]"
                "{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"),
    "llama-3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "mistral-instruct": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                         "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
                         "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"),
    "zephyr": ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    "gemma": ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
              "<start_of_turn>{{ role }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
}


class ContextWindowError(ContextFullError, ValueError):
    """The prompt and reply do not fit the context window (a ValueError, as llama-cpp-python raises)."""


class LlamaState:
    """What save_state() returns (llama-cpp-python's LlamaState fields where they apply)."""

    def __init__(self, state: EngineState, seed: int | None):
        self.engine_state, self.seed = state, seed

    @property
    def n_tokens(self) -> int:
        return self.engine_state.n_tokens

    @property
    def llama_state(self) -> bytes:
        return self.engine_state.cache

    @property
    def llama_state_size(self) -> int:
        return self.engine_state.nbytes


class Llama:
    """A GGUF model with llama-cpp-python's `Llama` interface.

    Args (llama-cpp-python's):
        model_path: the GGUF file.
        n_ctx: context window in tokens (full mode); 0 = the model's training context. In the sparse
            kv_modes the cache has n_cache cells and no window limit.
        n_threads: CPU threads (None: one per core).
        n_gpu_layers: 0 runs on the CPU; -1 (or >= the model's layers) on the GPU, or with a
            warning on the CPU where there is none. Splitting the layers between CPU and GPU is
            not supported.
        seed: sampling seed (LLAMA_DEFAULT_SEED or None: random).
        chat_format: a name in CHAT_FORMATS; None: the model's own template.
        embedding: allow create_embedding()/embed().
        n_batch, type_k/type_v (f16/f32 only), verbose.
    sepedge's own: kv_mode, n_init, n_sep, n_local, n_cache, keep_system.
    """

    def __init__(self, model_path: str, *, n_gpu_layers: int = 0, seed: int | None = LLAMA_DEFAULT_SEED,
                 n_ctx: int = 512, n_batch: int = 512, n_threads: int | None = None, embedding: bool = False,
                 chat_format: str | None = None, verbose: bool = True, type_k: str | int | None = None,
                 type_v: str | int | None = None, kv_mode: str = "full", n_init: int | None = None,
                 n_sep: int | None = None, n_local: int | None = None, n_cache: int | None = None,
                 keep_system: bool = True, **kwargs):
        self.model_path = os.fspath(model_path)
        self.verbose = verbose
        device = self._device(n_gpu_layers)
        kv_type = _kv_type(type_k, type_v)
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise InvalidArgumentError(f"chat_format {chat_format!r} is not known (known: {', '.join(CHAT_FORMATS)}; "
                                       "None uses the model's template)")
        self._seed = None if seed in (None, LLAMA_DEFAULT_SEED, -1) else int(seed)
        self._engine = Engine(self.model_path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, seed=self._seed,
                              kv_type=kv_type, device=device, kv_mode=kv_mode, n_init=n_init, n_sep=n_sep,
                              n_local=n_local, n_cache=n_cache, keep_system=keep_system)
        if chat_format is not None:
            self._engine.tokenizer.chat_template = CHAT_FORMATS[chat_format]
        self.chat_format = chat_format
        self.embedding = embedding
        self.metadata: dict[str, str] = {k: str(v) for k, v in self._engine.metadata_dict().items()}
        self._last_logits: np.ndarray | None = None
        if verbose:
            info = self._engine.info
            print(f"sepedge: {os.path.basename(self.model_path)}: {info['arch']}, {info['n_params'] / 1e6:.0f}M params, "
                  f"{device}, {kv_mode} cache of {self._engine.n_ctx} cells", file=sys.stderr)

    def _device(self, n_gpu_layers: int) -> str:
        if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int):
            raise InvalidArgumentError(f"n_gpu_layers must be an integer, got {n_gpu_layers!r}")
        if n_gpu_layers == 0:
            return "cpu"
        if n_gpu_layers > 0:
            with Model(self.model_path) as m:  # a mapping, no weights read
                n_layer = m.info["n_layer"]
        if n_gpu_layers < 0 or n_gpu_layers >= n_layer:
            if _cuda_devices() > 0:
                return "cuda"
            # as llama-cpp-python's CPU builds, which take n_gpu_layers=-1 and run on the CPU
            warnings.warn("n_gpu_layers: no CUDA GPU (or a build without CUDA): running on the CPU", stacklevel=3)
            return "cpu"
        raise InvalidArgumentError(f"n_gpu_layers={n_gpu_layers}: sepedge runs all {n_layer} layers on one device; "
                                   "splitting them between CPU and GPU is not supported (use 0 for the CPU, -1 for the GPU)")

    # --- llama-cpp-python's construction from the Hub

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str, additional_files: Sequence[str] | None = None,
                        local_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                        revision: str | None = None, **kwargs) -> Llama:
        """Download `filename` (a glob such as "*q8_0.gguf" picks the one file matching it) from a Hub
        repository through huggingface_hub, and load it."""
        import huggingface_hub
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        matches = [f for f in files if fnmatch.fnmatch(f, filename)]
        if not matches:
            raise InvalidArgumentError(f"no file in {repo_id} matches {filename!r} (files: {', '.join(files)})")
        if len(matches) > 1:
            raise InvalidArgumentError(f"several files in {repo_id} match {filename!r}: {', '.join(matches)}")
        for extra in additional_files or []:
            for f in [f for f in files if fnmatch.fnmatch(f, extra)]:
                huggingface_hub.hf_hub_download(repo_id, f, revision=revision, local_dir=local_dir, cache_dir=cache_dir)
        path = huggingface_hub.hf_hub_download(repo_id, matches[0], revision=revision, local_dir=local_dir,
                                               cache_dir=cache_dir)
        return cls(model_path=str(path), **kwargs)

    # --- lifetime

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- model facts

    def n_ctx(self) -> int:
        return self._engine.n_ctx

    def n_vocab(self) -> int:
        return self._engine.n_vocab

    def n_embd(self) -> int:
        return self._engine.n_embd

    def token_bos(self) -> int:
        return -1 if self._engine.tokenizer.bos_id is None else self._engine.tokenizer.bos_id

    def token_eos(self) -> int:
        return -1 if self._engine.tokenizer.eos_id is None else self._engine.tokenizer.eos_id

    def token_nl(self) -> int:
        return self.tokenize(b"\n", add_bos=False, special=False)[-1]

    @property
    def n_tokens(self) -> int:
        return self._engine._seen

    @property
    def engine(self) -> Engine:
        """The Engine underneath (sepedge's native API: kv_stats(), the cache's cells, ...)."""
        return self._engine

    # --- tokens

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._engine.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None, special: bool = False) -> bytes:
        return self._engine.detokenize(tokens, special=special)

    # --- low level: eval, sample, generate

    def reset(self) -> None:
        self._engine.reset()
        self._last_logits = None

    def set_seed(self, seed: int) -> None:
        self._seed = seed
        self._engine._rng.seed(seed)

    def eval(self, tokens: Sequence[int]) -> None:
        try:
            self._last_logits = self._engine.eval(tokens)
        except ContextFullError as e:
            raise ContextWindowError(str(e)) from None

    def sample(self, top_k: int = DEFAULTS["top_k"], top_p: float = DEFAULTS["top_p"], min_p: float = DEFAULTS["min_p"],
               temp: float = DEFAULTS["temperature"], repeat_penalty: float = DEFAULTS["repeat_penalty"], **kwargs) -> int:
        if self._last_logits is None:
            raise InvalidArgumentError("sample() needs eval() first")
        s = self._engine._sampler(temp, top_k, top_p, min_p, repeat_penalty, None)
        return s.sample(self._last_logits)

    def generate(self, tokens: Sequence[int], top_k: int = DEFAULTS["top_k"], top_p: float = DEFAULTS["top_p"],
                 min_p: float = DEFAULTS["min_p"], temp: float = DEFAULTS["temperature"],
                 repeat_penalty: float = DEFAULTS["repeat_penalty"], reset: bool = True, **kwargs) -> Iterator[int]:
        """Tokens after `tokens`, one by one, until the caller stops (llama-cpp-python's generate)."""
        eng = self._engine
        ids = eng._check_tokens(tokens)
        sampler = eng._sampler(temp, top_k, top_p, min_p, repeat_penalty, None)
        try:
            if reset:
                eng.reset()
            logits = eng._feed(ids) if reset or not eng._seen else eng.eval(ids)
            for t in ids:
                sampler.accept(t)
            while True:
                token = sampler.sample(logits)
                sampler.accept(token)
                yield token
                if not eng.sparse:
                    eng._check_room(eng._seen + 1)
                logits = eng._decode([token])
        except ContextFullError as e:
            raise ContextWindowError(str(e)) from None

    # --- completions

    def create_completion(self, prompt: str | list[int], suffix: str | None = None, max_tokens: int | None = 16,
                          temperature: float = DEFAULTS["temperature"], top_p: float = DEFAULTS["top_p"],
                          min_p: float = DEFAULTS["min_p"], typical_p: float = 1.0, logprobs: int | None = None,
                          echo: bool = False, stop: str | list[str] | None = None, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, repeat_penalty: float = DEFAULTS["repeat_penalty"],
                          top_k: int = DEFAULTS["top_k"], stream: bool = False, seed: int | None = None,
                          model: str | None = None, logit_bias: dict[int, float] | None = None, **kwargs):
        """A completion of `prompt` as llama-cpp-python returns it; max_tokens None or <= 0 runs to the
        end of generation (or of the context window)."""
        _unsupported(suffix=suffix, grammar=kwargs.get("grammar"), logits_processor=kwargs.get("logits_processor"),
                     stopping_criteria=kwargs.get("stopping_criteria"))
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8", "replace")
        return self._call(lambda: self._engine.create_completion(
            prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repeat_penalty=repeat_penalty, stop=stop, seed=self._seed_for(seed), stream=stream, echo=echo,
            logprobs=logprobs, logit_bias=logit_bias, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, model=model), stream)

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], temperature: float = 0.2, top_p: float = DEFAULTS["top_p"],
                               top_k: int = DEFAULTS["top_k"], min_p: float = DEFAULTS["min_p"], typical_p: float = 1.0,
                               stream: bool = False, stop: str | list[str] | None = None, seed: int | None = None,
                               response_format: dict | None = None, max_tokens: int | None = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = DEFAULTS["repeat_penalty"], model: str | None = None,
                               logit_bias: dict[int, float] | None = None, logprobs: bool | None = None,
                               top_logprobs: int | None = None, **kwargs):
        """The assistant's reply as llama-cpp-python returns it (OpenAI's chat.completion shape)."""
        _unsupported(tools=kwargs.get("tools"), functions=kwargs.get("functions"), grammar=kwargs.get("grammar"),
                     logits_processor=kwargs.get("logits_processor"))
        return self._call(lambda: self._engine.create_chat_completion(
            messages, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repeat_penalty=repeat_penalty, stop=stop, seed=self._seed_for(seed), stream=stream,
            logprobs=bool(logprobs), top_logprobs=top_logprobs, logit_bias=logit_bias,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, response_format=response_format,
            model=model), stream)

    def _seed_for(self, seed: int | None) -> int | None:
        return None if seed in (None, LLAMA_DEFAULT_SEED, -1) else seed

    def _call(self, make, stream: bool):
        """Run a create_* call, with a full context window as llama-cpp-python's ValueError."""
        try:
            out = make()
        except ContextFullError as e:
            raise ContextWindowError(str(e)) from None
        if not stream:
            return out

        def chunks():
            try:
                yield from out
            except ContextFullError as e:
                raise ContextWindowError(str(e)) from None
        return chunks()

    # --- embeddings

    def embed(self, input: str | list[str], normalize: bool = False, truncate: bool = True,
              return_count: bool = False):
        """The embedding of a text (a list of floats), or of each text of a list: the model's final
        hidden states mean-pooled over the tokens; normalize=True scales them to unit length.
        truncate: in full mode, texts longer than the window are cut to it (else an error)."""
        if not self.embedding:
            raise InvalidArgumentError("Llama model must be created with embedding=True to call this method")
        texts = [input] if isinstance(input, (str, bytes)) else list(input)
        out, count = [], 0
        for text in texts:
            ids = self._engine.tokenize(text)
            if truncate and not self._engine.sparse:
                ids = ids[:self._engine.n_ctx]
            count += len(ids)
            try:
                out.append(self._engine.embed(ids, normalize=normalize).tolist())
            except ContextFullError as e:
                raise ContextWindowError(str(e)) from None
        result = out[0] if isinstance(input, (str, bytes)) else out
        return (result, count) if return_count else result

    def create_embedding(self, input: str | list[str], model: str | None = None) -> dict:
        data, count = self.embed(input, return_count=True)
        if isinstance(input, (str, bytes)):
            data = [data]
        return {"object": "list", "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(data)],
                "model": model or self.model_path, "usage": {"prompt_tokens": count, "total_tokens": count}}

    # --- state

    def save_state(self) -> LlamaState:
        """The KV cache and its bookkeeping. With a sepllm-stream cache this stays at most n_cache
        cells (2 x n_layer x n_head_kv x head_dim values of 2 bytes each: 23 KiB per cell for
        SmolLM2-135M, 17.6 MiB for 800 cells) however long the conversation has run."""
        return LlamaState(self._engine.save_state(), self._seed)

    def load_state(self, state: LlamaState) -> None:
        if not isinstance(state, LlamaState):
            raise InvalidArgumentError(f"load_state takes what save_state() returned, got {type(state).__name__}")
        self._engine.load_state(state.engine_state)
        self._last_logits = None


def _cuda_devices() -> int:
    from ._ffi import ffi, lib
    n = ffi.new("int32_t *")
    return n[0] if lib.se_cuda_device_count(n) == 0 else 0


def _kv_type(type_k, type_v) -> str:
    """llama-cpp-python passes ggml type ids (0 f32, 1 f16) or None; sepedge stores f16 or f32."""
    names = {None: "f16", 0: "f32", 1: "f16", "f32": "f32", "f16": "f16"}
    if type_k not in names or type_v not in names:
        raise InvalidArgumentError(f"type_k/type_v: sepedge's KV cache is f16 or f32 (ggml types 1, 0), got {type_k!r}/{type_v!r}")
    k, v = names[type_k], names[type_v]
    if type_k is not None and type_v is not None and k != v:
        raise InvalidArgumentError("type_k and type_v must be the same in sepedge")
    return k if type_k is not None else v


def _unsupported(**given) -> None:
    used = [name for name, value in given.items() if value]
    if used:
        raise InvalidArgumentError(f"{', '.join(used)}: not supported by sepedge.Llama")

