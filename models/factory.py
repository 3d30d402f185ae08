"""Model construction: the one place that builds a model by name, for training, evaluation and ``astroflow models``.

It knows which architectures need ``img_size`` at construction and how local or hub weights are loaded, so every
caller builds models the same way.
"""
import os
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from timm.models import get_pretrained_cfg, load_state_dict

from . import astroformer  # noqa: F401  (registers the astroformer_* models)

__all__ = [
    'PretrainedUnavailableError',
    'WEIGHT_SUFFIXES',
    'create_model',
    'takes_img_size',
]

WEIGHT_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be had (no hub access, or none published for the model).

    A RuntimeError so callers can catch it and fall back to training from scratch.
    """


def takes_img_size(name: str) -> bool:
    """True where the architecture fixes its input size at construction (timm's ``fixed_input_size``).

    timm itself only forwards ``img_size`` to such models, so the same rule keeps CNNs, which take any size
    and often reject the argument, working.
    """
    cfg = get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


def _file_num_classes(path: Path, classifiers: Sequence[str]) -> int:
    """Classes in the file's classifier, or 0 for a headless file, so timm keeps a matching head and drops others."""
    state_dict = load_state_dict(str(path))
    for name in classifiers:
        weight = state_dict.get(f'{name}.weight')
        if weight is not None:
            return int(weight.shape[0])
    return 0


def create_model(
        name: str,
        *,
        num_classes: int,
        img_size: int,
        drop_path_rate: float = 0.0,
        pretrained: bool | str | os.PathLike = False,
        **kwargs: Any,
) -> torch.nn.Module:
    """Build a timm model (astroformer_* included) for ``num_classes`` at ``img_size``.

    ``pretrained`` may be a local ``.pth``/``.pt``/``.bin``/``.safetensors`` state dict, loaded through timm's
    ``pretrained_cfg_overlay=dict(file=...)`` so the usual adaptation applies: the classifier is kept when its
    size matches ``num_classes`` and replaced by a fresh one otherwise. ``pretrained=True`` loads the registry's
    weights and raises ``PretrainedUnavailableError`` when they cannot be fetched.
    """
    if takes_img_size(name):
        kwargs['img_size'] = img_size
    if drop_path_rate:
        kwargs['drop_path_rate'] = drop_path_rate
    kwargs['num_classes'] = num_classes

    if not pretrained:
        return timm.create_model(name, **kwargs)

    if pretrained is True:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as e:
            raise PretrainedUnavailableError(
                f'pretrained weights for {name!r} are unavailable ({type(e).__name__}: {e}); '
                'pass a local weights file or pretrained=False'
            ) from e

    path = Path(pretrained)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f'pretrained weights file {str(path)!r} must end in one of {", ".join(WEIGHT_SUFFIXES)}')
    if not path.is_file():
        raise FileNotFoundError(f'pretrained weights file {str(path)!r} does not exist')
    cfg = get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else None
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    overlay.update(file=str(path), num_classes=_file_num_classes(path, classifiers))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
