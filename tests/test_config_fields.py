"""Config values of the wrong kind (issue 17, class 1 and 2): every adapter_config.json and config.json
field the tool reads is checked up front, its type and range, finite numbers only. A wrong value is
one line and exit 2, before any work: no traceback, nothing left behind, the inputs untouched. Nothing
is coerced ("8", 8.0 or true where PEFT means an int). A source whose config.json disagrees with its
weights is refused as the target's always was."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_tree, refused, run_cli, transfer_args
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.adapter import load_adapter
from lowmem_crosslora.io.config_fields import check_adapter_config

# JSON values of every kind, finite or not.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "modules_to_save", "bias", "lora_dropout"]
FIELDS += ["layers_to_transform", "target_modules"]


def is_int(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def is_num(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


def valid(field: str, value: Any) -> bool:
    """What PEFT means by each field (an independent statement of the rules)."""
    if field == "r":
        return is_int(value, 1)
    if field == "lora_alpha":
        return is_num(value)
    if value is None:
        return True  # every other field may be absent or null
    if field == "rank_pattern":
        return isinstance(value, dict) and all(is_int(v, 1) for v in value.values())
    if field == "alpha_pattern":
        return isinstance(value, dict) and all(is_num(v) for v in value.values())
    if field in ("use_rslora", "use_dora"):
        return isinstance(value, bool)
    if field in ("modules_to_save", "target_modules"):
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if field == "bias":
        return isinstance(value, str)
    if field == "lora_dropout":
        return is_num(value) and 0 <= value < 1
    if field == "layers_to_transform":
        return is_int(value, 0) or (isinstance(value, list) and all(is_int(v, 0) for v in value))
    raise AssertionError(field)


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(FIELDS), JSON)
def test_each_field_is_accepted_exactly_when_it_means_what_peft_means(field: str, value: Any) -> None:
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, field: value}
    try:
        check_adapter_config(config, "adapter x")
    except InputError as e:
        assert not valid(field, value), (field, value)
        assert repr(field) in str(e) and "\n" not in str(e)
    else:
        assert valid(field, value), (field, value)


@pytest.fixture(scope="module")
def good(zoo: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"adapter": zoo.adapter("llama"), "source": zoo.model("llama"), "target": zoo.model("qwen2")}


@pytest.mark.parametrize(
    ("field", "value"),
    [("r", "8"), ("r", 8.0), ("r", True), ("lora_alpha", "16"), ("lora_alpha", float("nan")), ("rank_pattern", {"q_proj": 4.5}),
     ("alpha_pattern", {"q_proj": float("inf")}), ("alpha_pattern", {"q_proj": "x"}), ("use_rslora", "false"), ("lora_dropout", 2)],
)  # fmt: skip
def test_a_wrong_adapter_config_value_is_one_line_and_leaves_nothing(
    good: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: Any
) -> None:
    ad = copy_tree(good["adapter"], tmp_path / "adapter")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg[field] = value
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    line = refused(transfer_args({**good, "adapter": ad}, out), capsys, [ad], out)
    assert repr(field) in line


def test_a_deeply_nested_config_is_refused(good: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ad = copy_tree(good["adapter"], tmp_path / "adapter")
    (ad / "adapter_config.json").write_text('{"r": 8, "x": ' + "[" * 100000 + "]" * 100000 + "}")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    assert "nested too deeply" in refused(transfer_args({**good, "adapter": ad}, out), capsys, [ad], out)
    with pytest.raises(InputError):
        load_adapter(ad)


@pytest.mark.parametrize("role", ["source", "target"])
@pytest.mark.parametrize("value", ["64", 64.0, True, 0])
def test_a_wrong_model_dimension_is_refused(good: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str, value: Any) -> None:
    model = copy_tree(good[role], tmp_path / role)
    cfg = json.loads((model / "config.json").read_text())
    cfg["hidden_size"] = value
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    assert "'hidden_size'" in refused(transfer_args({**good, role: model}, out), capsys, [model], out)


def test_a_source_whose_config_disagrees_with_its_weights_is_refused(good: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = copy_tree(good["source"], tmp_path / "source")
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2  # the tensors keep their own size
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    line = refused(transfer_args({**good, "source": model}, out), capsys, [model], out)
    assert line.startswith("error: source: weight") and "config.json implies" in line


@pytest.mark.parametrize("alpha", [0, -8])
def test_a_zero_or_negative_alpha_is_warned_about(good: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], alpha: int) -> None:
    """Friction: lora_alpha 0 or negative is valid JSON and a valid number, but scales the update to
    nothing or flips it: the transfer runs and says so in a warning line."""
    ad = copy_tree(good["adapter"], tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["lora_alpha"] = alpha
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    rc, _out, err = run_cli(transfer_args({**good, "adapter": ad}, tmp_path / "out"), capsys)
    assert rc == 0, err
    assert "lora_alpha (or an alpha_pattern value) is zero or negative" in err
