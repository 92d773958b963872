"""Where a checkpoint comes from: a local directory, or a Hugging Face Hub repo id."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConvertError

# Files a conversion needs; everything else in a repo (PyTorch pickles, ONNX, GGUF copies) is skipped.
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "generation_config.json",
             "chat_template.json", "chat_template.jinja", "added_tokens.json"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(src: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory for `src`.

    A hub id is resolved with `snapshot_download`, which honours HF_HOME, HF_HUB_OFFLINE and
    HF_TOKEN, and falls back to the local cache when the Hub cannot be reached.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConvertError(f"{path}: not a checkpoint directory")
    if not _REPO_ID.match(str(src)):
        raise ConvertError(f"{src}: no such directory, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return Path(snapshot_download(str(src), revision=revision, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise ConvertError(f"{src}: the repo is gated; accept its license on huggingface.co and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConvertError(f"{src}: no such repo on the Hugging Face Hub (or it is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise ConvertError(f"{src}: the Hugging Face Hub cannot be reached and the repo is not in the local cache "
                           f"(HF_HOME); download it once, or pass a local directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise ConvertError(f"{src}: download from the Hugging Face Hub failed: {e}") from None
