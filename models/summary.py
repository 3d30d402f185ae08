"""Model construction and size summaries for the Astroformer family and the timm baselines.

``create_model`` is the one place that knows which architectures need ``img_size`` at construction and how
local or hub weights are loaded, so training, evaluation and ``astroflow models`` build models the same way.
"""
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
from timm.models import get_pretrained_cfg, load_state_dict
from timm.models.maxxvit import (
    ConvNeXtBlock,
    MaxxVit,
    MaxxVitBlock,
    MbConvBlock,
    ParallelMaxxVitBlock,
    TransformerBlock2d,
)
from torch.utils.flop_counter import FlopCounterMode

from . import astroformer  # noqa: F401  (registers the astroformer_* models)

__all__ = [
    'PretrainedUnavailableError',
    'WEIGHT_SUFFIXES',
    'block_stack',
    'count_macs',
    'create_model',
    'describe_model',
    'format_table',
    'takes_img_size',
]

WEIGHT_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')

_BLOCK_LETTERS = (
    (MbConvBlock, 'C'),
    (ConvNeXtBlock, 'C'),
    (TransformerBlock2d, 'T'),
    (MaxxVitBlock, 'M'),
    (ParallelMaxxVitBlock, 'PM'),
)


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


def block_stack(model: torch.nn.Module) -> Optional[str]:
    """Stage block types of a MaxxVit model as 'C-C-C-T' (a mixed stage reads 'CT'), None for other models."""
    if not isinstance(model, MaxxVit):
        return None
    stages = []
    for stage in model.stages:
        letters: List[str] = []
        for block in stage.blocks:
            letter = next(ltr for cls, ltr in _BLOCK_LETTERS if isinstance(block, cls))
            if not letters or letters[-1] != letter:
                letters.append(letter)
        stages.append(''.join(letters))
    return '-'.join(stages)


def count_macs(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> int:
    """MACs of one eval-mode forward of a single image, counted by torch's FlopCounterMode (MACs = FLOPs / 2)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _describe(name: str, img_size: int, num_classes: int, device: torch.device) -> Dict[str, Any]:
    """One ``describe_model`` row, with the model built on ``device``."""
    with device:
        model = create_model(name, num_classes=num_classes, img_size=img_size)
    measured = img_size
    try:
        macs = count_macs(model, img_size)
    except (RuntimeError, AssertionError, ValueError):
        if takes_img_size(name):
            raise
        measured = model.pretrained_cfg['input_size'][-1]
        macs = count_macs(model, measured)
    return {
        'name': name,
        'params': sum(p.numel() for p in model.parameters()),
        'gmacs': macs / 1e9,
        'img_size': measured,
        'stack': block_stack(model),
    }


def describe_model(name: str, *, img_size: int, num_classes: int) -> Dict[str, Any]:
    """Params, GMACs and block stack of ``name`` built for ``num_classes`` and measured at ``img_size``.

    Models that take ``img_size`` are built for it. Others are built without it and measured at ``img_size``;
    if their forward rejects that size they are measured at their default input size, and the returned
    ``img_size`` is always the size actually measured. Built on the meta device, so even astroformer_5 costs
    no memory and no compute; models that cannot run there are measured on the CPU.
    """
    try:
        return _describe(name, img_size, num_classes, torch.device('meta'))
    except (NotImplementedError, RuntimeError):
        return _describe(name, img_size, num_classes, torch.device('cpu'))


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Aligned text table of ``describe_model`` rows (params in millions), for ``astroflow models``."""
    header = ('model', 'params (M)', 'GMACs', 'img', 'stack')
    body = [
        (
            str(r['name']),
            f"{r['params'] / 1e6:.2f}",
            f"{r['gmacs']:.3f}",
            str(r['img_size']),
            r['stack'] or '-',
        )
        for r in rows
    ]
    numeric = (False, True, True, True, False)
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return '  '.join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)
        ).rstrip()

    rule = '  '.join('-' * w for w in widths)
    return '\n'.join([line(header), rule, *(line(row) for row in body)])
