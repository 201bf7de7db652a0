import inspect

import pytest

from rewards import REWARDS, build_reward
from rewards.base import Reward
from rewards.jpeg import JpegCompressibility
from rewards.registry import reward_options


def test_registered_names():
    assert set(REWARDS) == {"jpeg_compressibility", "jpeg_incompressibility", "clip_score", "aesthetic", "llava_bertscore",
                            "shapes_judge"}
    for name, cls in REWARDS.items():
        assert cls.name == name


def test_build_reward():
    reward = build_reward("jpeg_compressibility", quality=80)
    assert isinstance(reward, JpegCompressibility) and isinstance(reward, Reward)
    assert reward.quality == 80


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"'jpeg'.*\['aesthetic', 'clip_score', 'jpeg_compressibility'"):
        build_reward("jpeg")


def test_unknown_option_names_reward_option_and_valid_options():
    with pytest.raises(ValueError, match=r"'clip_score'.*\['modle'\].*\['device', 'model', 'model_config'"):
        build_reward("clip_score", modle="ViT-B-32")


def test_reward_options_defaults():
    assert reward_options("jpeg_compressibility") == {"quality": 95}
    assert reward_options("clip_score") == {
        "model": "ViT-H-14",
        "pretrained": "laion2b_s32b_b79k",
        "model_config": None,
        "device": "cpu",
        "seed": 0,
    }
    assert reward_options("aesthetic") == {
        "clip_model": "ViT-L-14",
        "clip_pretrained": "openai",
        "model_config": None,
        "head_path": None,
        "device": "cpu",
        "seed": 0,
    }
    for name in REWARDS:
        assert inspect.Parameter.empty not in reward_options(name).values()
    with pytest.raises(ValueError, match="valid rewards"):
        reward_options("nope")
