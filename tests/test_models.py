"""Astroformer registrations, model construction and the size summaries behind ``astroflow models``."""
import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from timm.layers import DropPath, RelPosBias
from timm.models.maxxvit import MbConvBlock, TransformerBlock2d

import models
from models import PretrainedUnavailableError, create_model, describe_model, format_table
from models.astroformer import model_cfgs
from models.factory import takes_img_size

# (embed_dim, depths, stem_width) from github.com/Rishit-dagli/Astroformer astroformer.py model_cfgs
PAPER_CFGS = {
    'astroformer_0': ((96, 192, 384, 768), (2, 3, 5, 2), 64),
    'astroformer_1': ((96, 192, 384, 768), (2, 6, 14, 2), 64),
    'astroformer_2': ((128, 256, 512, 1024), (2, 6, 14, 2), 128),
    'astroformer_3': ((192, 384, 768, 1536), (2, 6, 14, 2), 192),
    'astroformer_4': ((192, 384, 768, 1536), (2, 12, 28, 2), 192),
    'astroformer_5': ((256, 512, 1280, 2048), (2, 12, 28, 2), 192),
}
# parameter counts with a 10-class head, as measured when the configs were written
PAPER_PARAMS_M = {
    'astroformer_0': 22.77,
    'astroformer_1': 37.39,
    'astroformer_2': 66.37,
    'astroformer_3': 148.89,
    'astroformer_4': 241.09,
    'astroformer_5': 593.56,
}
SMALL = ('astroformer_pico', 'astroformer_nano', 'astroformer_micro')


def _check_stack(model: torch.nn.Module, depths: tuple, img_size: int) -> None:
    """Stages 0-2 are MBConv only; stage 3 is relative-position attention over the whole 1/32 map."""
    assert [len(stage.blocks) for stage in model.stages] == list(depths)
    for stage in model.stages[:3]:
        assert all(isinstance(b, MbConvBlock) for b in stage.blocks)
    for block in model.stages[3].blocks:
        assert isinstance(block, TransformerBlock2d)
        assert isinstance(block.attn.rel_pos, RelPosBias)
        assert block.attn.rel_pos.window_size == (img_size // 32, img_size // 32)


@pytest.mark.parametrize('name', sorted(PAPER_CFGS))
def test_paper_cfgs_registered(name):
    embed_dim, depths, stem_width = PAPER_CFGS[name]
    assert timm.is_model(name)
    cfg = model_cfgs[name]
    assert cfg.block_type == ('C', 'C', 'C', 'T')
    assert cfg.embed_dim == embed_dim
    assert cfg.depths == depths
    assert cfg.stem_width == stem_width
    assert cfg.head_hidden_size == embed_dim[-1]
    assert cfg.transformer_cfg.rel_pos_type == 'bias'
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    assert pretrained_cfg.num_classes == 10
    assert pretrained_cfg.input_size == (3, 256, 256)
    assert not pretrained_cfg.has_weights


@pytest.mark.parametrize('name', sorted(PAPER_CFGS))
def test_paper_models_build_on_meta(name):
    _, depths, _ = PAPER_CFGS[name]
    model = timm.create_model(name, device='meta')
    assert model.num_classes == 10
    _check_stack(model, depths, img_size=256)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(PAPER_PARAMS_M[name], rel=0.01)


@pytest.mark.parametrize('img_size', [224, 256])
def test_astroformer_0_forward(img_size):
    model = timm.create_model('astroformer_0', img_size=img_size, num_classes=10).eval()
    _check_stack(model, PAPER_CFGS['astroformer_0'][1], img_size)
    with torch.inference_mode():
        out = model(torch.randn(1, 3, img_size, img_size))
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('img_size', [64, 128, 224, 256])
def test_small_forward_at_sizes(name, img_size):
    model = timm.create_model(name, img_size=img_size, num_classes=10).eval()
    _check_stack(model, model_cfgs[name].depths, img_size)
    with torch.inference_mode():
        out = model(torch.randn(2, 3, img_size, img_size))
    assert out.shape == (2, 10)


def test_small_defaults_are_64px():
    for name in SMALL:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size == (3, 64, 64)
        assert model_cfgs[name].block_type == ('C', 'C', 'C', 'T')


def test_small_train_step():
    model = create_model('astroformer_pico', num_classes=10, img_size=64, drop_path_rate=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_drop_path_rate_reaches_blocks():
    model = create_model('astroformer_nano', num_classes=10, img_size=64, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)
    last = model.stages[-1].blocks[-1]
    assert last.drop_path1.drop_prob == pytest.approx(0.2)
    assert last.drop_path2.drop_prob == pytest.approx(0.2)
    plain = create_model('astroformer_nano', num_classes=10, img_size=64)
    assert not any(isinstance(m, DropPath) for m in plain.modules())


def test_takes_img_size():
    assert takes_img_size('astroformer_pico')
    assert takes_img_size('coatnet_0_224')
    assert not takes_img_size('resnet18')
    assert not takes_img_size('efficientnetv2_rw_s')


def test_describe_model_stacks():
    astro = describe_model('astroformer_pico', img_size=64, num_classes=10)
    assert set(astro) == {'name', 'params', 'gmacs', 'img_size', 'stack'}
    assert astro['name'] == 'astroformer_pico'
    assert astro['stack'] == 'C-C-C-T'
    assert astro['params'] > 0 and astro['gmacs'] > 0
    assert astro['img_size'] == 64
    coat = describe_model('coatnet_0_224', img_size=224, num_classes=10)
    assert coat['stack'] == 'C-C-T-T'
    assert coat['gmacs'] > 1
    resnet = describe_model('resnet18', img_size=64, num_classes=10)
    assert resnet['stack'] is None
    assert resnet['params'] > 0 and resnet['gmacs'] > 0


def test_describe_model_big_paper_model_is_cheap():
    row = describe_model('astroformer_5', img_size=256, num_classes=10)
    assert row['params'] / 1e6 == pytest.approx(PAPER_PARAMS_M['astroformer_5'], rel=0.01)
    assert row['gmacs'] > 100


def test_describe_model_cnn_macs_scale_with_pixels():
    small = describe_model('resnet18', img_size=64, num_classes=10)
    large = describe_model('resnet18', img_size=128, num_classes=10)
    assert large['img_size'] == 128
    assert large['params'] == small['params']
    assert large['gmacs'] / small['gmacs'] == pytest.approx(4.0, rel=0.05)


def test_describe_model_macs_match_direct_count():
    row = describe_model('astroformer_pico', img_size=128, num_classes=10)
    # Counted on the meta device, as describe_model does: on the CPU, torch >= 2.14 runs attention through a fused
    # SDPA kernel that FlopCounterMode does not count, which would miss the attention matmuls (about 0.06 % here).
    with torch.device('meta'):
        model = create_model('astroformer_pico', num_classes=10, img_size=128)
    assert row['gmacs'] * 1e9 == models.summary.count_macs(model, 128)


def test_format_table_aligns_columns():
    rows = [
        {'name': 'astroformer_pico', 'params': 209_705, 'gmacs': 0.0198, 'img_size': 64, 'stack': 'C-C-C-T'},
        {'name': 'resnet18', 'params': 11_181_642, 'gmacs': 0.148, 'img_size': 64, 'stack': None},
    ]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split()[0] == 'model'
    assert 'astroformer_pico' in lines[2] and 'C-C-C-T' in lines[2]
    assert lines[3].startswith('resnet18') and lines[3].endswith('-')
    params_end = lines[0].index('params (M)') + len('params (M)')
    assert lines[2][:params_end].endswith('0.21')
    assert lines[3][:params_end].endswith('11.18')


def test_create_model_local_weights_replace_head(tmp_path):
    source = timm.create_model('resnet18')
    path = tmp_path / 'resnet18.pth'
    torch.save(source.state_dict(), path)
    model = create_model('resnet18', num_classes=6, img_size=64, pretrained=str(path))
    assert model.fc.out_features == 6
    expected = source.state_dict()
    loaded = model.state_dict()
    body = [k for k in loaded if not k.startswith('fc.')]
    assert body and all(torch.equal(loaded[k], expected[k]) for k in body)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 6)


def test_create_model_local_weights_keep_matching_head(tmp_path):
    source = timm.create_model('astroformer_pico')
    path = tmp_path / 'pico.safetensors'
    safetensors.torch.save_file(source.state_dict(), path)
    same = create_model('astroformer_pico', num_classes=10, img_size=64, pretrained=path)
    assert torch.equal(same.head.fc.weight, source.head.fc.weight)
    other = create_model('astroformer_pico', num_classes=3, img_size=64, pretrained=path)
    assert other.head.fc.out_features == 3
    assert torch.equal(other.head.pre_logits.fc.weight, source.head.pre_logits.fc.weight)


def test_create_model_bad_weights_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        create_model('resnet18', num_classes=6, img_size=64, pretrained=str(tmp_path / 'missing.pth'))
    with pytest.raises(ValueError, match='must end in'):
        create_model('resnet18', num_classes=6, img_size=64, pretrained=str(tmp_path / 'weights.txt'))


def test_pretrained_true_without_published_weights():
    with pytest.raises(PretrainedUnavailableError) as info:
        create_model('astroformer_pico', num_classes=10, img_size=64, pretrained=True)
    assert isinstance(info.value, RuntimeError)
    assert 'astroformer_pico' in str(info.value)


def test_pretrained_true_with_hub_unreachable(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path))
    with pytest.raises(RuntimeError, match='unavailable'):
        create_model('resnet18', num_classes=10, img_size=64, pretrained=True)


def test_astroformer_models_lists_every_registration():
    assert models.ASTROFORMER_MODELS == (*SMALL, *sorted(PAPER_CFGS))
    assert set(timm.list_models('astroformer_*')) == set(models.ASTROFORMER_MODELS)
