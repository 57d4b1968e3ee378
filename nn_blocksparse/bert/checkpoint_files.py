"""The files of a transformers BERT checkpoint folder: reading them without pickle, writing them back.

A folder holds ``config.json`` and its weights as ``model.safetensors`` or ``pytorch_model.bin``,
either of them possibly split into shards listed by a ``.index.json``. Reading refuses what could
run code or reach outside the folder: a ``.bin`` is a pickle, so it is unpickled with
``weights_only=True`` (tensors and containers only), and a shard index may name only files of the
folder itself. Key names are brought to what a transformers 5 model expects: the ``gamma``/``beta``
LayerNorm names of TF-converted checkpoints are renamed, and the ``bert.`` prefix of head models
is added or dropped to fit the model asked for. Writing drops tied duplicates (safetensors cannot
hold tensors that share storage) and removes a weights file of the other format left from an
earlier save. Nothing here knows about pruning.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_BIN_FILE = "pytorch_model.bin"
PYTORCH_BIN_INDEX_FILE = "pytorch_model.bin.index.json"

# The prefix transformers gives the encoder inside every BERT head model (BertPreTrainedModel.base_model_prefix).
BASE_PREFIX = "bert."

# Old (TF-converted / pytorch-pretrained-bert) LayerNorm parameter names.
_LEGACY_LAYERNORM_RENAMES = ((re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),
                             (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"))


def read_json(file: Path, missing_message: str):
    """The JSON value in ``file``; ValueError with ``missing_message`` when there is no such file, or
    naming the file when it is not JSON."""
    if not file.is_file():
        raise ValueError(missing_message)
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None


def read_config(folder: Path):
    """The JSON value in ``folder``'s ``config.json``; ValueError when the folder or the file is not there."""
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist (or is not a directory)")
    return read_json(folder / CONFIG_FILE, f"no {CONFIG_FILE} in {folder}")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` (preferred) or ``pytorch_model.bin``, sharded variants included."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(file), device="cpu")
        except SafetensorError as err:
            raise ValueError(f"{file} is not a readable safetensors file: {err}") from None

    def read_bin(file: Path) -> dict[str, torch.Tensor]:
        # weights_only=True: a .bin is a pickle, and only tensors/containers may be unpickled.
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{file} holds objects other than tensors; refusing to unpickle it (weights_only=True): {err}"
            ) from err
        if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ValueError(f"{file} does not contain a flat dict of tensors (a state dict)")
        return dict(loaded)

    def read_sharded(index_file: Path, read_shard) -> dict[str, torch.Tensor]:
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_file} is not a shard index ({{\"weight_map\": {{name: file}}}}): {err!r}") from None
        shards = set(weight_map.values()) if isinstance(weight_map, Mapping) else None
        # Shards are files of this folder: a name with a path in it could read files elsewhere.
        if shards is None or not all(isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..")
                                     for f in shards):
            raise ValueError(f"{index_file}: weight_map must map tensor names to file names in {folder}")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(shards):
            state.update(read_shard(folder / shard))
        return state

    if (folder / SAFETENSORS_FILE).is_file():
        return read_safetensors(folder / SAFETENSORS_FILE)
    if (folder / SAFETENSORS_INDEX_FILE).is_file():
        return read_sharded(folder / SAFETENSORS_INDEX_FILE, read_safetensors)
    if (folder / PYTORCH_BIN_FILE).is_file():
        return read_bin(folder / PYTORCH_BIN_FILE)
    if (folder / PYTORCH_BIN_INDEX_FILE).is_file():
        return read_sharded(folder / PYTORCH_BIN_INDEX_FILE, read_bin)
    raise ValueError(
        f"no weights file in {folder}: expected {SAFETENSORS_FILE} or {PYTORCH_BIN_FILE} "
        f"(or their sharded .index.json variants)"
    )


def weight_names(folder: Path) -> set[str] | None:
    """The tensor names of ``folder``'s safetensors weights, read from the headers alone (a shard
    index's names for a sharded one); None for a ``pytorch_model.bin`` (a pickle: not read twice)."""
    from safetensors import SafetensorError, safe_open

    if (folder / SAFETENSORS_FILE).is_file():
        try:
            with safe_open(str(folder / SAFETENSORS_FILE), framework="pt") as weights:
                return set(weights.keys())
        except SafetensorError as err:
            raise ValueError(f"{folder / SAFETENSORS_FILE} is not a readable safetensors file: {err}") from None
    if (folder / SAFETENSORS_INDEX_FILE).is_file():
        index = read_json(folder / SAFETENSORS_INDEX_FILE, f"no {SAFETENSORS_INDEX_FILE} in {folder}")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, Mapping):
            raise ValueError(f"{folder / SAFETENSORS_INDEX_FILE} is not a shard index "
                             "({\"weight_map\": {name: file}})")
        return set(weight_map)
    return None


def rename_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _LEGACY_LAYERNORM_RENAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = tensor
    return renamed


def align_prefix(state_dict: dict[str, torch.Tensor], model_uses_prefix: bool) -> dict[str, torch.Tensor]:
    """Make checkpoint key names match the model's (with or without the ``bert.`` prefix).

    * head model from a bare ``BertModel`` checkpoint: add ``bert.`` (the head weights will then be
      reported missing by the strict load, which is the honest answer);
    * ``BertModel`` from a head-model checkpoint: keep the ``bert.`` subtree and drop the head
      (``qa_outputs``, ``cls``, ``classifier``): asking for the base model means "the encoder only",
      exactly what ``from_pretrained`` does.
    """
    has_prefixed = any(k.startswith(BASE_PREFIX) for k in state_dict)
    if model_uses_prefix and not has_prefixed:
        return {BASE_PREFIX + k: v for k, v in state_dict.items()}
    if not model_uses_prefix and has_prefixed:
        head_keys = sorted(k for k in state_dict if not k.startswith(BASE_PREFIX))
        if head_keys:
            logger.info("loading the base model only; dropping task-head weights %s", head_keys)
        return {k[len(BASE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(BASE_PREFIX)}
    return state_dict


def _dedupe_shared_tensors(state: dict[str, torch.Tensor], preferred: set[str]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights): keep one name per storage.

    transformers 4 did the same on save and re-tied on load; ``preferred`` names (tie sources, e.g.
    the word embeddings) win over their tied targets.
    """
    by_storage: dict[tuple, str] = {}
    for key in sorted(state, key=lambda k: (k not in preferred, k)):
        tensor = state[key]
        storage_key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and storage_key in by_storage:
            continue
        by_storage[storage_key] = key
    kept_names = set(by_storage.values()) | {k for k, t in state.items() if not t.numel()}
    return {k: v for k, v in state.items() if k in kept_names}


def write_checkpoint(folder: Path, config_dict: dict, state: dict[str, torch.Tensor], safe_serialization: bool,
                     tie_sources: set[str]) -> Path:
    """Write ``config.json`` and the weights (``model.safetensors``, or ``pytorch_model.bin``) into ``folder``.

    ``tie_sources`` names the tensors that win when tied tensors share storage (safetensors only).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    if safe_serialization:
        from safetensors.torch import save_file

        deduped = _dedupe_shared_tensors(state, preferred=tie_sources)
        save_file({k: v.contiguous().clone() for k, v in deduped.items()}, str(folder / SAFETENSORS_FILE),
                  metadata={"format": "pt"})
        stale = folder / PYTORCH_BIN_FILE
    else:
        # clone(): entries may share storage with a live model; a plain dict of independent tensors is
        # what transformers 4 wrote.
        torch.save({k: v.contiguous().clone() for k, v in state.items()}, folder / PYTORCH_BIN_FILE)
        stale = folder / SAFETENSORS_FILE
    # A leftover weights file of the other format would be preferred/confusing on the next load.
    if stale.exists():
        stale.unlink()
    return folder
