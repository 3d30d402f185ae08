from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_and_presets_load():
    for path in [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        # presets for user data (folder/h5) leave data.path to the command line
        assert isinstance(load_config(path, ["data.path=/data/input"]), Config), path


@pytest.mark.parametrize(
    "override, key",
    [
        ("trian.epochs=3", "trian"),
        ("train.epcohs=3", "train.epcohs"),
        ("data.synthetic.num_imgs=5", "data.synthetic.num_imgs"),
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=-1", "train.epochs"),
        ("data.chunk_size=0", "data.chunk_size"),
        ("split.train=0.5", "split"),
        ("data.source=h5", "data"),
        ("shard.image_format=gif", "shard.image_format"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"  {key}:" in str(err.value)


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"train": {"epochs": 3, "learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(p)


def test_overrides_parse_yaml_types_and_nest():
    cfg = load_config(None, ["train.epochs=7", "data.center_crop=0.5", "model.pretrained=true", "validate.image_shape=[8,8,3]"])
    assert cfg.train.epochs == 7 and cfg.data.center_crop == 0.5
    assert cfg.model.pretrained is True and cfg.validate_.image_shape == [8, 8, 3]


def test_override_syntax_errors():
    for bad in ["epochs=3", "train.epochs", "train.epochs=[1"]:
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def test_section_hash_only_depends_on_its_sections():
    a = load_config(None, ["train.epochs=3"])
    b = load_config(None, ["train.epochs=4"])
    assert a.section_hash("split", "shard") == b.section_hash("split", "shard")
    assert a.section_hash("train") != b.section_hash("train")
    assert a.hash() != b.hash()


def test_yaml_spelling_round_trips(tmp_path):
    cfg = load_config(None, ["validate.max_duplicate_images=3"])
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(p)
    assert again == cfg and "validate" in cfg.to_dict()
