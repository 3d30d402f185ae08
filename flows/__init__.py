"""Prefect flows over the same stage functions as the CLI and DVC (``docs/orchestration.md``).

Flow parameters are the params.yaml sections as their pydantic models, so the Prefect UI renders a
form for each; ``config_from_parameters`` turns them back into one validated ``Config``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flows import _fork  # noqa: F401  (Prefect 3.8 fork-exit bug workaround; see the module)
from pipeline.config import Config, config_from_dict, load_config

# A flow parameter named after the ``validate`` section shadows pydantic's deprecated BaseModel.validate
# in Prefect's generated parameter model; harmless, and the name must match params.yaml.
warnings.filterwarnings("ignore", message='Field name "validate" .* shadows an attribute', category=UserWarning)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_from_parameters(base_params: str | None, workdir: Path, sections: Mapping[str, BaseModel]) -> Config:
    """``base_params`` (or the defaults), then every field a flow parameter explicitly sets, validated as one.

    Only fields that were set count (``exclude_unset``): a run that passes ``{"train": {"epochs": 2}}``
    changes ``train.epochs`` and keeps the rest of ``train`` from the params file, and a section left at
    its default keeps the file's values entirely. A UI form submits whole sections, which then win whole.
    """
    origin = "flow parameters"
    base: dict[str, Any] = {}
    if base_params:
        path = Path(base_params).expanduser()
        path = path if path.is_absolute() else Path(workdir) / path
        base = load_config(path).to_dict()
        origin = f"{path} + flow parameters"
    raw = base
    for name, section in sections.items():
        raw = _merge(raw, {name: section.model_dump(mode="json", by_alias=True, exclude_unset=True)})
    return config_from_dict(raw, origin)
