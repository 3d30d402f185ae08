"""Model registrations and helpers; importing this package registers ``astroformer_*`` in timm."""
from . import astroformer
from .astroformer import ASTROFORMER_MODELS
from .factory import PretrainedUnavailableError, create_model
from .summary import describe_model, format_table

__all__ = [
    'ASTROFORMER_MODELS',
    'PretrainedUnavailableError',
    'astroformer',
    'create_model',
    'describe_model',
    'format_table',
]
