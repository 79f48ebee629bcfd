"""`utils.fields`: options made from a config dataclass's documented fields say and default to
what the dataclass does, and parse back into it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from p2s_jax.evaluation.annotate import AnnotateConfig
from p2s_jax.evaluation.config import EvalConfig
from p2s_jax.train.study import StudyConfig
from p2s_jax.utils.fields import field_docs, field_options, field_values


@dataclasses.dataclass(frozen=True)
class _Documented:
    """A config.

    Attributes:
      size: images per
        shard.
      rate: a rate; 0: off.

    Raises:
      nothing: a later section is not a field.
    """

    size: int = 16
    rate: float = 0.5


@pytest.mark.parametrize("cls", [StudyConfig, AnnotateConfig, EvalConfig, _Documented])
def test_every_field_is_documented_once(cls):
    docs = field_docs(cls)
    assert set(docs) == {f.name for f in dataclasses.fields(cls)}
    assert all(text and not text.startswith(" ") for text in docs.values())


def test_continuation_lines_join_and_later_sections_end_the_list():
    assert field_docs(_Documented) == {"size": "images per shard.", "rate": "a rate; 0: off."}


def test_an_undocumented_field_is_refused():
    @dataclasses.dataclass
    class Bare:
        """Attributes:
          size: documented.
        """

        size: int = 1
        other: int = 2

    with pytest.raises(ValueError, match=r"documents no field \['other'\]"):
        field_docs(Bare)


def test_options_parse_back_into_the_config():
    parser = argparse.ArgumentParser()
    for option, keywords in field_options(StudyConfig, {"--points": "num_points",
                                                        "--seeds": "seeds"}):
        parser.add_argument(option, **keywords)
    values = vars(parser.parse_args([]))
    assert field_values(StudyConfig, values) == StudyConfig()
    values = vars(parser.parse_args(["--points", "5", "--seeds", "3"]))
    assert field_values(StudyConfig, values, samplers=("center", "mask_refine")) == StudyConfig(
        ("center", "mask_refine"), num_points=5, seeds=3)
    (_, points), = field_options(StudyConfig, {"--points": "num_points"})
    assert points["help"].startswith("K, points per person") and "(default 8)" in points["help"]
    (_, batch), = field_options(EvalConfig, {"--batch-size": "images_per_device"}, unset=True)
    assert batch["default"] is None and batch["type"] is int and batch["metavar"] == "BATCH_SIZE"
