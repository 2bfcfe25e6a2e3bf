from pathlib import Path

import pytest
import yaml

from medseg.config import Config, load_config, save_config
from medseg.errors import ConfigError


def test_defaults_and_overrides():
    config = load_config(None, ["train.epochs=5", "data.spacing=[1, 1, 2.5]", "train.max_time=240"])
    assert config.train.epochs == 5
    assert config.data.spacing == [1.0, 1.0, 2.5]
    assert config.train.max_time == 240.0
    assert Config().model.name == "unet"


def test_heart_config_documents_every_default():
    """configs/heart.yaml is the annotated list of settings: it must hold every key, with the
    built-in default (a key added to the code but not to the file fails here)."""
    heart = Path(__file__).resolve().parents[1] / "configs" / "heart.yaml"
    written = yaml.safe_load(heart.read_text())
    defaults = Config().to_dict()
    del defaults["data"]["root"], defaults["train"]["output_dir"]  # given as --data and --output
    assert {k: sorted(v) for k, v in written.items()} == {k: sorted(v) for k, v in defaults.items()}
    assert load_config(heart) == Config()


def test_keep_largest_takes_a_word_or_labels():
    assert load_config(None, ["infer.keep_largest=all"]).infer.keep_largest == "all"
    assert load_config(None, ["infer.keep_largest=[1, 3]"]).infer.keep_largest == [1, 3]


def test_yaml_round_trip(tmp_path):
    config = load_config(None, ["model.channels=[8, 16, 32]"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=5", "unknown key 'train.epoch' (did you mean 'epochs'?)"),
        ("trian.epochs=5", "unknown key 'trian' (did you mean 'train'?)"),
        ("train.epochs=five", "'train.epochs' must be int, got 'five'"),
        ("model.channels=16", "'model.channels' must be a list, got 16"),
        ("train.epochs", "expected key=value"),
        ("train.epochs=-3", "'train.epochs' must be more than 0, got -3"),
        ("train.epochs=0", "'train.epochs' must be more than 0, got 0"),
        ("train.max_time=0", "'train.max_time' must be more than 0, got 0.0"),
        ("train.iters_per_epoch=-1", "'train.iters_per_epoch' must be more than 0"),
        # accepted once, then failing at prediction or misused without a word
        ("infer.overlap=1.5", "'infer.overlap' must be at least 0 and below 1, got 1.5"),
        ("infer.overlap=1", "'infer.overlap' must be at least 0 and below 1"),
        ("data.val_fraction=1.5", "'data.val_fraction' must be at least 0 and below 1, got 1.5"),
        ("augment.flip_prob=2", "'augment.flip_prob' must be at least 0 and at most 1"),
        ("model.channels=[]", "'model.channels' must be a list of positive numbers, got []"),
        ("model.channels=[16]", "'model.channels' needs 2 or more levels"),
        ("data.spacing=[1, 0, 1]", "'data.spacing' must be a list of positive numbers"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.where == str(path)
    assert "unknown key 'train.learning_rate'" in info.value.message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_a_time_budget_alone_is_not_cut_short_by_the_default_epochs():
    assert load_config(None, []).train.epoch_limit == 40
    assert load_config(None, ["train.max_time=600"]).train.epoch_limit == float("inf")
    # both given: whichever comes first
    assert load_config(None, ["train.max_time=600", "train.epochs=5"]).train.epoch_limit == 5
