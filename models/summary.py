"""Size summaries (parameters, MACs, block stack) for the Astroformer family and the timm baselines."""
from typing import Any, Dict, List, Optional, Sequence

import torch
from timm.models.maxxvit import (
    ConvNeXtBlock,
    MaxxVit,
    MaxxVitBlock,
    MbConvBlock,
    ParallelMaxxVitBlock,
    TransformerBlock2d,
)
from torch.utils.flop_counter import FlopCounterMode

from .factory import create_model, takes_img_size

__all__ = [
    'block_stack',
    'count_macs',
    'describe_model',
    'format_table',
]

_BLOCK_LETTERS = (
    (MbConvBlock, 'C'),
    (ConvNeXtBlock, 'C'),
    (TransformerBlock2d, 'T'),
    (MaxxVitBlock, 'M'),
    (ParallelMaxxVitBlock, 'PM'),
)


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
