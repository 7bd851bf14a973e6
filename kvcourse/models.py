"""Load the course's bundled model, or any hub id / local path, the ``from_pretrained`` way.

``load_model()`` gives the small Llama the course ships in ``kvcourse/bard`` (trained by
``kvcourse.train``), which works offline. Any other name goes through the same
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` path, so
``load_model("HuggingFaceTB/SmolLM2-135M")`` works for a learner with internet, and fails
with a clear message, naming the bundled default, for one without.

Errors name the real cause first: a local folder that is empty or lacks its config, weights or
tokenizer; a dtype that cannot hold weights (``torch.int8``); a path that does not exist.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .devices import pick_device, pick_dtype

BUNDLED_MODEL = Path(__file__).resolve().parent / "bard"
BUNDLED_NAMES = ("bard", "bundled", "kvcourse/bard")
# The draft model of notebook 10 (speculative decoding): a smaller Llama on the bundled model's tokenizer.
DRAFT_MODEL = Path(__file__).resolve().parent / "bard_draft"
DRAFT_NAMES = ("bard_draft", "kvcourse/bard_draft")


class ModelNotAvailableError(OSError):
    """The model is neither a local folder, nor in the Hugging Face cache, nor downloadable now."""


def _offline_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_name(name: str | os.PathLike | None) -> str:
    """The bundled model's folder for ``None``/"bard", the draft model's for "bard_draft"; any other name unchanged."""
    if name is None or str(name) in BUNDLED_NAMES:
        if not (BUNDLED_MODEL / "config.json").exists():
            raise ModelNotAvailableError(
                f"the bundled model is missing from {BUNDLED_MODEL}: reinstall kvcourse, or rebuild it with "
                f"`python -m kvcourse.train --out {BUNDLED_MODEL}`"
            )
        return str(BUNDLED_MODEL)
    if str(name) in DRAFT_NAMES:
        if not (DRAFT_MODEL / "config.json").exists():
            raise ModelNotAvailableError(
                f"the draft model is missing from {DRAFT_MODEL}: reinstall kvcourse, or rebuild it with the command "
                f"in kvcourse/bard_draft/README.md (python -m kvcourse.train --tokenizer kvcourse/bard ...)"
            )
        return str(DRAFT_MODEL)
    if not isinstance(name, str | os.PathLike):
        raise TypeError(f"model name must be a string or path, not {type(name).__name__}")
    return str(name)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "none"


def _looks_like_a_path(name: str) -> bool:
    """A name that can only be a local path, never an ``org/model`` hub id: absolute, starting with ``.`` or
    ``~``, or with more than one ``/``."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _check_model_folder(folder: Path) -> None:
    """Name what a local model folder lacks: its config, its weights, or its tokenizer."""
    files = {p.name for p in folder.iterdir()}
    if not files:
        raise ModelNotAvailableError(
            f"folder {folder} is empty: a model folder holds config.json, the weights (model.safetensors) and the "
            f"tokenizer files, as written by model.save_pretrained(folder) and tokenizer.save_pretrained(folder). "
            f"The course's bundled model: load_model()"
        )
    if "config.json" not in files:
        raise ModelNotAvailableError(
            f"folder {folder} has no config.json, so it is not a model saved with save_pretrained "
            f"(files: {_listing(folder)})"
        )
    if not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
        raise ModelNotAvailableError(
            f"folder {folder} has a config.json but no weights (model.safetensors or pytorch_model.bin; "
            f"files: {_listing(folder)}): save them with model.save_pretrained(folder)"
        )
    if not files.intersection(_TOKENIZER_FILES):
        raise ModelNotAvailableError(
            f"folder {folder} has a model but no tokenizer (none of {', '.join(_TOKENIZER_FILES[:2])}, ...; "
            f"files: {_listing(folder)}): save it there with tokenizer.save_pretrained(folder)"
        )


def load_model(name: str | os.PathLike | None = None, *, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = None, local_files_only: bool | None = None):
    """Return ``(model, tokenizer)``, the model in eval mode on ``device``.

    name: ``None`` (the bundled model), a hub id such as ``"HuggingFaceTB/SmolLM2-135M"``, or a
        local folder written by ``save_pretrained``.
    device: ``"auto"`` picks cuda, then mps, then cpu; or name one (``"cpu"``, ``"cuda:0"``).
    dtype: ``None`` for float32 (exact comparisons), or ``"bfloat16"``/``"float16"``/a torch dtype.
    local_files_only: never touch the network; defaults to on when ``HF_HUB_OFFLINE=1``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)  # a non-float dtype (torch.int8) is refused here, by name
    path = resolve_name(name)
    folder = Path(path).expanduser()
    if folder.is_dir():
        _check_model_folder(folder)
        path = str(folder)
    elif folder.exists():
        raise ModelNotAvailableError(
            f"could not load model {str(name)!r}: {folder} is a file; pass the folder that holds config.json, the "
            f"weights and the tokenizer (as written by save_pretrained)"
        )
    elif _looks_like_a_path(path):
        raise ModelNotAvailableError(
            f"could not load model {str(name)!r}: there is no folder {folder} (a relative path is read from "
            f"{Path.cwd()}). The course's bundled model: load_model()"
        )
    offline = _offline_env() if local_files_only is None else local_files_only
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its bar writes to stderr, which nbgrader scores as a failed test
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=offline)
    except (OSError, ValueError) as err:
        if folder.is_dir():  # a local folder: say which part of it failed, not "not in the cache"
            raise ModelNotAvailableError(
                f"could not load the model in folder {folder} (files: {_listing(folder)}): "
                f"transformers said: {str(err).splitlines()[0]}"
            ) from err
        where = "offline mode is on" if offline else "the hub could not be reached or has no such model"
        raise ModelNotAvailableError(
            f"could not load model {str(name)!r}: it is not a local folder, not in the Hugging Face cache, and "
            f"{where}.\nThe course's bundled model works offline: load_model() (or load_model('bard')).\n"
            f"To use a hub model, run once with internet so it is cached, then offline works too.\n"
            f"(transformers said: {str(err).splitlines()[0]})"
        ) from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(dev).eval(), tokenizer
