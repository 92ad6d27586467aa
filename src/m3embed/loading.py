"""Where a model's files come from: a folder or a Hub snapshot (:func:`resolve_model_path`), its head
files, and transformers' progress bars kept quiet while it loads."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


@contextlib.contextmanager
def no_library_progress_bars():
    """transformers' own tqdm bars off for the duration (restored after): loading a local folder,
    saving a checkpoint inside the training bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def resolve_model_path(name_or_path: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """The local folder of a model given as a folder path or a Hub name (``owner/name``).

    What the user typed is named in every error, instead of the Hub client's "Repo id must be in the
    form ..." for what was meant as a path: a string that looks like a path (starts with ``.``, ``/``
    or ``~``, has more than one ``/``, or a backslash) is never sent to the Hub.
    """
    given = str(name_or_path)
    path = Path(given).expanduser()
    expected = "give a BGE-M3-layout folder or a Hub name"
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ValueError(
                f"model folder {given} has no config.json (nor a LoRA adapter's adapter_config.json), so it "
                f"is not a model folder; {expected} (a folder with config.json, the tokenizer files and the "
                "weights, e.g. a checkpoint-<step>)"
            )
        return path
    if path.exists():
        raise FileNotFoundError(f"model folder {given} is a file, not a folder; {expected}")
    looks_like_path = given.startswith((".", "/", "~")) or given.count("/") > 1 or "\\" in given
    if looks_like_path or not given:
        raise FileNotFoundError(f"model folder {given} not found; {expected}")

    # A Hub name: fetch the whole snapshot so the head files come too (FlagEmbedding does the same).
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(given, cache_dir=cache_dir))
    except HFValidationError:
        raise FileNotFoundError(f"model folder {given} not found; {expected}") from None
    except LocalEntryNotFoundError:
        hub = (
            "the Hub is offline (HF_HUB_OFFLINE is set)"
            if constants.HF_HUB_OFFLINE
            else "the Hub could not be reached"
        )
        raise FileNotFoundError(
            f"model folder {given} not found; {expected} ({given!r} is not a local folder, not in the "
            f"Hub cache, and {hub})"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise FileNotFoundError(
            f"model folder {given} not found; {expected} ({given!r} is not a local folder, and the Hub "
            "has no public model of that name)"
        ) from None


def load_head(path: Path) -> dict[str, torch.Tensor] | None:
    """A head file's state dict (on the CPU), or ``None`` when the folder has none."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
