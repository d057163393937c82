"""The Triton-layout model repository: config.pbtxt round trips, hand-written configs, versions and policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.repository import (
    ConfigError,
    ModelConfig,
    TensorConfig,
    available_versions,
    format_config,
    model_names,
    parse_config,
    read_config,
    served_versions,
    write_config,
)


def config(**kw) -> ModelConfig:
    base = dict(
        name="mmoe",
        inputs=[TensorConfig("dense", "FP32", (8,)), TensorConfig("user_ids", "INT64", (-1,))],
        outputs=[TensorConfig("click", "FP32", (1,)), TensorConfig("dwell", "FP16", (1,))],
    )
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"version_policy": "all", "instance_count": 3, "instance_kind": "KIND_GPU"},
        {"version_policy": "specific", "specific_versions": [1, 3]},
        {"version_policy": "latest", "latest_num_versions": 2, "preferred_batch_size": [8, 64]},
        {
            "parameters": {"intra_op_thread_count": "1", "note": 'a "quoted" \\ value'},
            "max_queue_delay_microseconds": 0,
        },
    ],
)
def test_format_and_parse_are_inverses(kw: dict) -> None:
    cfg = config(**kw)
    assert parse_config(format_config(cfg)) == cfg


def test_parses_a_hand_written_triton_config() -> None:
    # The style of Triton's own examples: comments, repeated fields instead of lists, no colons before messages.
    text = """
    # a model written by hand
    name: "census"
    platform: "onnxruntime_onnx"
    max_batch_size: 256
    input { name: "dense" data_type: TYPE_FP32 dims: [ 7 ] }
    input { name: "ids" data_type: TYPE_INT64 dims: 5 }   # dims as a repeated scalar
    output [ { name: "income" data_type: TYPE_FP32 dims: [ 1 ] } ]
    dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 250 }
    instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 kind: KIND_CPU } ]
    version_policy: { latest: { num_versions: 2 } }
    """
    cfg = parse_config(text)
    assert cfg.name == "census" and cfg.max_batch_size == 256
    assert cfg.inputs == [TensorConfig("dense", "FP32", (7,)), TensorConfig("ids", "INT64", (5,))]
    assert cfg.outputs == [TensorConfig("income", "FP32", (1,))]
    assert cfg.max_queue_delay_microseconds == 250 and cfg.preferred_batch_size == [4, 8]
    assert cfg.instance_count == 3  # summed over the groups
    assert (cfg.version_policy, cfg.latest_num_versions) == ("latest", 2)


def test_syntax_errors_name_file_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"my.pbtxt:3:9: unexpected character '\?'"):
        parse_config('name: "x"\nmax_batch_size: 4\ninput [ ? ]', "my.pbtxt")
    with pytest.raises(ConfigError, match="missing '}'"):
        parse_config('name: "x"\ndynamic_batching { max_queue_delay_microseconds: 5 ', "c.pbtxt")
    with pytest.raises(ConfigError, match="unsupported data_type 'TYPE_COMPLEX'"):
        parse_config('name: "x" input { name: "a" data_type: TYPE_COMPLEX dims: [1] }')
    with pytest.raises(ConfigError, match="no model name"):
        parse_config("max_batch_size: 4")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.pbtxt").write_text('name: "mmoe"')
    with pytest.raises(ConfigError, match="differs from its directory 'other'"):
        read_config(tmp_path, "other")
    with pytest.raises(ConfigError, match="cannot read"):
        read_config(tmp_path, "missing")


def test_repository_listing_versions_and_policies(tmp_path: Path) -> None:
    write_config(tmp_path, config())
    write_config(tmp_path, config(name="esmm"))
    (tmp_path / "not_a_model").mkdir()
    for v in (1, 2, 10):
        (tmp_path / "mmoe" / str(v)).mkdir()
        (tmp_path / "mmoe" / str(v) / "model.onnx").write_bytes(b"x")
    (tmp_path / "mmoe" / "3").mkdir()  # no model.onnx yet (an export in progress): not a version
    (tmp_path / "mmoe" / "tmp").mkdir()
    assert model_names(tmp_path) == ["esmm", "mmoe"]
    assert model_names(tmp_path / "nowhere") == []
    assert available_versions(tmp_path, "mmoe") == [1, 2, 10]  # numeric order, not string order
    assert available_versions(tmp_path, "esmm") == []
    assert read_config(tmp_path, "mmoe") == config()
    avail = [1, 2, 10]
    assert served_versions(config(), avail) == [10]
    assert served_versions(config(latest_num_versions=2), avail) == [2, 10]
    assert served_versions(config(version_policy="all"), avail) == [1, 2, 10]
    assert served_versions(config(version_policy="specific", specific_versions=[2, 7]), avail) == [2]
    assert served_versions(config(), []) == []
    assert not list((tmp_path / "mmoe").glob(".*.tmp"))  # written atomically


def test_tensor_config_checks_its_datatype() -> None:
    with pytest.raises(ValueError, match="unknown datatype 'FLOAT'"):
        TensorConfig("x", "FLOAT", (1,))
