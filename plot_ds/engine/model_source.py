"""Where a model comes from: a built-in, a local folder or a hub id, found (or not) with one clear
message saying what to do (``ModelError``), and checked to be a causal LM before anything loads it."""

from __future__ import annotations

import os
from pathlib import Path

from ..assets import resolve_model_path
from ..errors import ModelError

# Besides transformers' causal-LM classes: multimodal checkpoints whose text model generates.
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a folder."""
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or name.endswith("/")
        or (os.sep != "/" and os.sep in name)
    )


def model_source(name_or_path: str, revision: str | None, trust_remote_code: bool):
    """``name_or_path`` resolved (builtins converted), with its Hugging Face config; a model that
    cannot be found, reached or used as a causal LM is a ``ModelError`` saying what to do."""
    from transformers import AutoConfig

    source = resolve_model_path(name_or_path)
    where = f"model.name_or_path '{name_or_path}'"
    folder = Path(source).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ModelError(
            f"{where}: the folder {folder.resolve()} has no config.json, so it is not a Hugging Face "
            "model folder; point it at the folder save_pretrained wrote"
        )
    if not folder.is_dir() and _looks_like_path(source):
        raise ModelError(
            f"{where}: no such folder ({folder.resolve()}); check the path, or give a hub id "
            "such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    try:
        hf_config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "does not recognize this architecture" not in str(err):
            raise
        import transformers

        model_type = str(err).split("model type `")[1].split("`")[0] if "model type `" in str(err) else "?"
        raise ModelError(
            f"{where}: config.json's model type '{model_type}' is unknown to transformers "
            f"{transformers.__version__}; upgrade transformers, or set model.trust_remote_code true if "
            "the model ships its own code (and you trust it)"
        ) from None
    except OSError as err:
        if folder.is_dir():
            raise ModelError(f"{where}: {folder.resolve()}/config.json cannot be read: {err}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
        )
        reason = (
            "HF_HUB_OFFLINE is set, so nothing is downloaded"
            if offline
            else "the Hugging Face hub could not be reached"
        )
        raise ModelError(
            f"{where}: not a local folder, not in the Hugging Face cache ({cache}), and {reason}. "
            f"Download it once where there is network (hf download {source}"
            f"{f' --revision {revision}' if revision else ''}), "
            f"{'unset HF_HUB_OFFLINE, ' if offline else ''}or set model.name_or_path to a local "
            "model folder"
        ) from None
    if not trust_remote_code:
        _check_causal_lm(where, hf_config)
    return source, hf_config


def _check_causal_lm(where: str, hf_config) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"{where}: model type '{hf_config.model_type}' has no causal-LM class in transformers "
            "(AutoModelForCausalLM), so it cannot generate or be preference-tuned here; use a "
            "decoder (…ForCausalLM) checkpoint"
        )
    causal = {
        name
        for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        for name in (names if isinstance(names, (list, tuple)) else [names])
    }
    heads = [a for a in hf_config.architectures or [] if a not in causal and not a.endswith(_CAUSAL_LM_SUFFIXES)]
    if hf_config.architectures and len(heads) == len(hf_config.architectures):
        raise ModelError(
            f"{where}: its config.json says it is a {', '.join(heads)}, not a causal language model: "
            "loaded as one, its LM head would start from random weights. Use the causal-LM "
            "checkpoint it was fine-tuned from (…ForCausalLM)"
        )
