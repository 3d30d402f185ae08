"""Astroformer: CoAtNet with a C-C-C-T stack, registered in timm's model registry.

Astroformer (Dagli 2023, arXiv:2304.05350) is CoAtNet with the third stage switched from relative
attention to MBConv, so attention only runs on the 1/32 feature map. That keeps the convolutional
inductive bias for the small Galaxy10 DECals training set (~17.7k images).

Depths, widths, stem widths and head sizes of ``astroformer_0`` .. ``astroformer_5`` follow the paper's own
code, github.com/Rishit-dagli/Astroformer (commit d6d4530, ``astroformer.py``, ``model_cfgs``). They equal
timm's paper-style ``coatnet_0_224`` .. ``coatnet_5_224`` configs (the CoAtNet paper's L/D tables, its stem
being timm's two-conv ``Stem``) and use the same default ``MaxxVitConvCfg`` / ``MaxxVitTransformerCfg``: GELU
MBConv with SE and batch norm, pre-norm transformer blocks with a learned relative position bias table
(``rel_pos_type='bias'``), and a norm + MLP pre-logits head. The only difference to CoAtNet is ``block_type``.

``astroformer_pico`` / ``astroformer_nano`` / ``astroformer_micro`` are not in the paper: scaled-down members of the same family that
train on a laptop CPU at 64x64 for demos and tests.

The last stage's attention covers the whole 1/32 feature map, so its relative position table is sized by
``img_size`` at construction: ``timm.create_model('astroformer_0', img_size=224)``.
"""
from typing import Any, Dict, Tuple

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.maxxvit import MaxxVit, MaxxVitCfg, checkpoint_filter_fn

__all__ = ['ASTROFORMER_MODELS', 'ASTROFORMER_STACK', 'model_cfgs']

ASTROFORMER_STACK = ('C', 'C', 'C', 'T')


def _astro_cfg(embed_dim: Tuple[int, ...], depths: Tuple[int, ...], stem_width: int) -> MaxxVitCfg:
    """CoAtNet cfg with the Astroformer stack; the head MLP is as wide as the last stage, as in CoAtNet."""
    return MaxxVitCfg(
        embed_dim=embed_dim,
        depths=depths,
        block_type=ASTROFORMER_STACK,
        stem_width=stem_width,
        head_hidden_size=embed_dim[-1],
    )


model_cfgs: Dict[str, MaxxVitCfg] = dict(
    astroformer_pico=_astro_cfg((32, 48, 64, 96), (1, 1, 1, 1), stem_width=32),
    astroformer_nano=_astro_cfg((48, 64, 96, 128), (1, 2, 2, 1), stem_width=32),
    astroformer_micro=_astro_cfg((64, 128, 192, 256), (1, 2, 3, 1), stem_width=32),
    astroformer_0=_astro_cfg((96, 192, 384, 768), (2, 3, 5, 2), stem_width=64),
    astroformer_1=_astro_cfg((96, 192, 384, 768), (2, 6, 14, 2), stem_width=64),
    astroformer_2=_astro_cfg((128, 256, 512, 1024), (2, 6, 14, 2), stem_width=128),
    astroformer_3=_astro_cfg((192, 384, 768, 1536), (2, 6, 14, 2), stem_width=192),
    astroformer_4=_astro_cfg((192, 384, 768, 1536), (2, 12, 28, 2), stem_width=192),
    astroformer_5=_astro_cfg((256, 512, 1280, 2048), (2, 12, 28, 2), stem_width=192),
)

ASTROFORMER_MODELS: Tuple[str, ...] = tuple(model_cfgs)


def _create_astroformer(variant: str, pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """Build through timm so pretrained_cfg, feature extraction and weight loading behave as for coatnet."""
    return build_model_with_cfg(
        MaxxVit,
        variant,
        pretrained,
        model_cfg=model_cfgs[variant],
        feature_cfg=dict(flatten_sequential=True),
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _cfg(img_size: int = 256, **kwargs: Any) -> Dict[str, Any]:
    """Galaxy10 DECals defaults: 10 classes, 256x256 images used whole, so no centre crop."""
    return {
        'url': '',
        'num_classes': 10,
        'input_size': (3, img_size, img_size),
        'pool_size': (img_size // 32, img_size // 32),
        'crop_pct': 1.0,
        'interpolation': 'bicubic',
        'mean': (0.5, 0.5, 0.5),
        'std': (0.5, 0.5, 0.5),
        'first_conv': 'stem.conv1',
        'classifier': 'head.fc',
        'fixed_input_size': True,
        'paper_ids': 'arXiv:2304.05350',
        'paper_name': 'Astroformer: More Data Might not be all you need for Classification',
        'origin_url': 'https://github.com/Rishit-dagli/Astroformer',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'astroformer_pico': _cfg(img_size=64),
    'astroformer_nano': _cfg(img_size=64),
    'astroformer_micro': _cfg(img_size=64),
    'astroformer_0': _cfg(),
    'astroformer_1': _cfg(),
    'astroformer_2': _cfg(),
    'astroformer_3': _cfg(),
    'astroformer_4': _cfg(),
    'astroformer_5': _cfg(),
})


@register_model
def astroformer_pico(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """Demo/test size: trains at 64x64 on a 2-core CPU in minutes."""
    return _create_astroformer('astroformer_pico', pretrained=pretrained, **kwargs)


@register_model
def astroformer_nano(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """Slightly deeper and wider than pico, still CPU-trainable at 64x64."""
    return _create_astroformer('astroformer_nano', pretrained=pretrained, **kwargs)


@register_model
def astroformer_micro(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """Between nano and 0 (about 2 M parameters): the size a 2-core CPU trains on a few thousand real galaxies
    at 64x64 in minutes per epoch (``configs/small_real.yaml``)."""
    return _create_astroformer('astroformer_micro', pretrained=pretrained, **kwargs)


@register_model
def astroformer_0(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """CoAtNet-0 sizes, the smallest paper configuration."""
    return _create_astroformer('astroformer_0', pretrained=pretrained, **kwargs)


@register_model
def astroformer_1(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """CoAtNet-1 sizes."""
    return _create_astroformer('astroformer_1', pretrained=pretrained, **kwargs)


@register_model
def astroformer_2(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """CoAtNet-2 sizes."""
    return _create_astroformer('astroformer_2', pretrained=pretrained, **kwargs)


@register_model
def astroformer_3(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """CoAtNet-3 sizes."""
    return _create_astroformer('astroformer_3', pretrained=pretrained, **kwargs)


@register_model
def astroformer_4(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """CoAtNet-4 sizes; the paper's best Galaxy10 DECals model (94.86% top-1)."""
    return _create_astroformer('astroformer_4', pretrained=pretrained, **kwargs)


@register_model
def astroformer_5(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """CoAtNet-5 sizes."""
    return _create_astroformer('astroformer_5', pretrained=pretrained, **kwargs)
