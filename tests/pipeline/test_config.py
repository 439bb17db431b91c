"""Cycle configs: the digits default loads, and every kind of mistake fails before anything runs, naming the key."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainguard.pipeline.config import DEFAULT_TRACKING_URI, CycleConfig, load_config
from trainguard.pipeline.errors import ConfigError

DIGITS = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"
BASE: dict[str, Any] = yaml.safe_load(DIGITS.read_text())
BASE["project"] = str(DIGITS.parents[1] / "examples")  # configs written to tmp_path still import the example


def _write(tmp_path: Path, data: Any, name: str = "cycle.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _with(change: dict[tuple[str | int, ...], Any]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for keys, value in change.items():
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return data


def _error(tmp_path: Path, data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, data))
    assert "\n" not in str(caught.value)
    return caught.value


def test_the_digits_default_loads_and_builds_its_model() -> None:
    config = load_config(DIGITS)
    assert config.model.class_path == "digits_demo.models.DigitsClassifier"
    model = config.model.instantiate()
    assert model.hparams.channels == BASE["model"]["init_args"]["channels"]
    resolved = config.resolved()
    assert resolved["trainer"]["init_args"]["max_epochs"] == BASE["trainer"]["init_args"]["max_epochs"]
    assert resolved["output"]["state_file"] is None and config.output.state_path.name == "state.json"


def test_a_wrong_type_names_its_key_path(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("training", "batch_size"): "many"}))
    assert error.key == "training.batch_size"
    assert "training.batch_size: Input should be a valid integer" in str(error)
    assert str(tmp_path / "cycle.yaml") in str(error)


def test_an_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    data = _with({("training", "batch_sise"): 3})
    assert _error(tmp_path, data).key == "training.batch_sise"


def test_a_missing_section_is_named(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    del data["output"]
    error = _error(tmp_path, data)
    assert error.key == "output" and "Field required" in str(error)


def test_a_union_field_error_names_the_field_not_the_union_member(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("dataset", "holdout", "data_dir"): 3.5}))
    assert error.key == "dataset.holdout.data_dir"


def test_cross_field_rules_are_checked(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("adversarial", "bounds"): [1.0, 0.0]}))
    assert error.key == "adversarial" and "low < high" in str(error)


def test_a_class_that_does_not_exist_is_refused_before_anything_runs(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("model", "class_path"): "digits_demo.models.NoSuchModel"}))
    assert error.key == "model.class_path" and "NoSuchModel" in str(error)
    error = _error(tmp_path, _with({("model", "class_path"): "no_such_package.Model"}))
    assert error.key == "model.class_path" and "cannot import" in str(error)


def test_a_class_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("model", "class_path"): "digits_demo.models.DigitsCNN"}))
    assert "is not a pytorch_lightning.LightningModule" in str(error)


def test_init_args_must_bind_to_the_constructor(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("model", "init_args"): {"chanels": 8}}))
    assert error.key == "model.init_args.chanels"
    error = _error(tmp_path, _with({("model", "init_args"): {"lr": "fast"}}))
    assert error.key == "model.init_args.lr" and "float" in str(error)


def test_yaml_scientific_notation_is_coerced_to_the_annotated_type(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, _with({("model", "init_args"): {"lr": "1e-3"}})))
    assert config.model.instantiate().hparams.lr == pytest.approx(1e-3)


def test_callbacks_are_checked_with_their_index(tmp_path: Path) -> None:
    good = {"class_path": "pytorch_lightning.callbacks.EarlyStopping", "init_args": {"monitor": "val/loss"}}
    bad = {"class_path": "pytorch_lightning.callbacks.EarlyStopping", "init_args": {"monitor": "m", "patience": "x"}}
    config = load_config(_write(tmp_path, _with({("callbacks",): [good]})))
    assert config.callbacks[0].instantiate().monitor == "val/loss"
    error = _error(tmp_path, _with({("callbacks",): [good, bad]}))
    assert error.key == "callbacks[1].init_args.patience"


def test_arguments_the_cycle_injects_must_not_be_configured(tmp_path: Path) -> None:
    path = _write(tmp_path, _with({("model", "init_args", "lr"): 0.1}))
    with pytest.raises(ConfigError, match=r"model\.init_args\.lr: supplied by the cycle"):
        load_config(path, injected={"model": ["lr"]})


def test_mlflow_tracking_uri_from_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(_write(tmp_path, _with({("tracking", "uri"): "http://configured:5000"})))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert config.tracking.resolved_uri() == "http://configured:5000"
    assert load_config(DIGITS).tracking.resolved_uri() == DEFAULT_TRACKING_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert config.tracking.resolved_uri() == "http://env:5000"


def test_unreadable_empty_and_invalid_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path / "fifo.yaml")
    with pytest.raises(ConfigError, match="empty"):
        load_config(_write(tmp_path, ""))
    with pytest.raises(ConfigError, match="not valid YAML at line 1"):
        load_config(_write(tmp_path, "training: [unclosed"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(_write(tmp_path, "- a list\n"))


def _duplicated(text: str) -> tuple[str, int]:
    """The digits config with a second `enabled: false` in its roni section, and that line's number."""
    lines = text.splitlines()
    at = lines.index("  enabled: true", lines.index("roni:")) + 1
    lines.insert(at + 1, "  enabled: false")
    return "\n".join(lines) + "\n", at + 2


def test_a_repeated_key_is_refused_naming_the_key_and_its_line(tmp_path: Path) -> None:
    text, line = _duplicated(DIGITS.read_text())
    error = _error(tmp_path, text.replace("project: ../examples", f"project: {BASE['project']}"))
    assert f"not valid YAML at line {line}, column 3: duplicate key 'enabled'" in str(error)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into the config except class paths (importing random module names runs random code)."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            if key != "class_path":
                found.append((*prefix, key))
                found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found.append((*prefix, index))
            found += _paths(value, (*prefix, index))
    return found


_PATHS = _paths(BASE)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_random_text_only_ever_raises_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as error:
        assert "\n" not in str(error)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(_PATHS), _json, st.booleans()), min_size=1, max_size=3))
def test_malformed_configs_only_ever_raise_config_error(tmp_path: Path, edits: list) -> None:
    data = copy.deepcopy(BASE)
    for keys, value, delete in edits:
        node = data
        try:
            for key in keys[:-1]:
                node = node[key]
            if delete:
                del node[keys[-1]]
            else:
                node[keys[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    path = tmp_path / "mutated.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        assert isinstance(load_config(path), CycleConfig)
    except ConfigError as error:
        assert "\n" not in str(error) and error.key


def test_a_missing_required_init_arg_is_named(tmp_path: Path) -> None:
    early = {"class_path": "pytorch_lightning.callbacks.EarlyStopping", "init_args": {"patience": 2}}
    error = _error(tmp_path, _with({("callbacks",): [early]}))
    assert error.key == "callbacks[0].init_args" and "monitor" in str(error)


def test_roni_options_are_checked_against_the_screening_config(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("roni", "options"): {"kk": 3}}))
    assert error.key == "roni.options.kk"
    error = _error(tmp_path, _with({("roni", "options"): {"k": "big"}}))
    assert error.key == "roni.options.k"


def test_roni_error_rate_knobs_live_in_the_roni_section_and_must_be_able_to_reject(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, _with({("roni", "level"): 0.05, ("roni", "calibration_draws"): 99})))
    assert config.roni.screening_options()["level"] == 0.05
    assert config.roni.screening_options()["combination"] == "brown"
    error = _error(tmp_path, _with({("roni", "options"): {"level": 0.05}}))
    assert error.key.startswith("roni") and "roni section itself" in str(error)
    error = _error(tmp_path, _with({("roni", "calibration_draws"): 50}))
    assert error.key.startswith("roni") and "cannot reach" in str(error)
    error = _error(tmp_path, _with({("roni", "combination"): "tippett"}))
    assert error.key == "roni.combination"


def test_a_datamodule_is_refused_as_the_cycle_trains_on_its_verified_data_only(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("datamodule",): {"class_path": "pytorch_lightning.LightningDataModule"}}))
    assert error.key == "datamodule" and "verified data module" in str(error)


def test_trusted_sources_is_refused_with_the_way_to_grant_trust_by_key(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("dataset", "trusted_sources"): ["curator"]}))
    assert error.key == "dataset"
    assert "trusted_sources was removed" in str(error) and "role `trusted`" in str(error)


def test_every_manifest_reference_names_its_dataset(tmp_path: Path) -> None:
    data = _with({})
    del data["dataset"]["holdout"]["dataset"]
    error = _error(tmp_path, data)
    assert error.key == "dataset.holdout.dataset" and "required" in str(error)
    error = _error(tmp_path, _with({("dataset", "training", 0, "dataset"): "../other"}))
    assert error.key == "dataset.training.0.dataset" and "'../other' is not a dataset name" in str(error)


def test_a_manifest_reference_refuses_a_key_it_does_not_know(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("dataset", "holdout", "datset"): "digits-trusted"}))
    assert error.key == "dataset.holdout.datset" and "unknown key" in str(error)


REGRESSION_TARGETS = {("validation", "labels"): [], ("validation", "targets"): {"min": 0, "max": 9}}


def test_the_task_key_takes_a_name_or_a_section(tmp_path: Path) -> None:
    assert load_config(DIGITS).task.kind == "classification"
    regression = _with({("task",): "regression", **REGRESSION_TARGETS})
    assert load_config(_write(tmp_path, regression)).task.kind == "regression"
    section = load_config(
        _write(tmp_path, _with({("task",): {"kind": "regression", "tolerance": 0.1}, **REGRESSION_TARGETS}))
    ).task
    assert (section.kind, section.tolerance) == ("regression", 0.1)
    error = _error(tmp_path, _with({("task",): "ranking"}))
    assert error.key == "task" and "'classification', 'multilabel' or 'regression'" in str(error)
    assert _error(tmp_path, _with({("task",): {"kind": "regression", "tolerance": 0}})).key == "task.tolerance"


def test_the_validation_targets_must_fit_the_task(tmp_path: Path) -> None:
    """Classification lists class labels; regression and multilabel describe real targets (shape, range) instead,
    each mistake one line naming the key."""
    error = _error(tmp_path, _with({("task",): "regression"}))
    assert error.key == "validation.labels" and "describe its targets in validation.targets" in str(error)
    error = _error(tmp_path, _with({("task",): "multilabel", ("validation", "labels"): []}))
    assert error.key == "validation.targets" and "shape, min, max" in str(error)
    error = _error(tmp_path, _with({("validation", "targets"): {"min": 0, "max": 1}}))
    assert error.key == "validation.targets" and "classification task's targets" in str(error)
    multilabel = {("task",): "multilabel", ("validation", "labels"): [], ("validation", "targets"): {"max": 1}}
    assert _error(tmp_path, _with(multilabel)).key == "validation.targets.shape"
    columns = {**REGRESSION_TARGETS, ("task",): "regression", ("validation", "target_columns"): ["a", "b"]}
    error = _error(tmp_path, _with(columns))
    assert error.key == "validation.targets.shape" and "2 target_columns" in str(error)
    error = _error(tmp_path, _with({("validation", "targets"): {"min": 2, "max": 1}}))
    assert error.key == "validation.targets"
    section = load_config(_write(tmp_path, _with({**columns, ("validation", "targets", "shape"): [2]}))).validation
    assert section.table_targets == ("a", "b") and section.target_names == ("a", "b")


def test_model_forward_imports_a_function_from_the_project(tmp_path: Path) -> None:
    (tmp_path / "hooks_fh.py").write_text("def masked(module, batch, x):\n    return module(x)\n\nclass NotOne: ...\n")
    hook = {("project",): ".", ("model_forward",): "hooks_fh.masked"}
    config = load_config(_write(tmp_path, _with(hook)))
    assert config.forward_hook().__name__ == "masked" and load_config(DIGITS).forward_hook() is None
    error = _error(tmp_path, _with({**hook, ("model_forward",): "hooks_fh.NotOne"}))
    assert error.key == "model_forward" and "no function 'NotOne'" in str(error)
    error = _error(tmp_path, _with({**hook, ("model_forward",): "nohooks_fh.masked"}))
    assert error.key == "model_forward" and "project:" in str(error)
    error = _error(tmp_path, _with({**hook, ("detectors",): {"enabled": True}}))
    assert "disable them with model_forward" in str(error)


def test_the_trainer_block_is_bound_to_lightnings_trainer(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, _with({("trainer", "init_args"): {"max_epochs": "3", "precision": 32}})))
    assert config.trainer.arg("max_epochs") == "3" and config.trainer.arg("deterministic") is True
    assert config.trainer.instantiate(logger=False).max_epochs == 3
    error = _error(tmp_path, _with({("trainer", "init_args", "max_epoch"): 3}))
    assert error.key == "trainer.init_args.max_epoch" and "max_epochs" in str(error)
    error = _error(tmp_path, _with({("trainer", "init_args", "logger"): False}))
    assert error.key == "trainer.init_args.logger" and "supplied by the cycle" in str(error)


def test_trainer_keys_left_in_the_training_section_say_where_they_moved(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("training", "max_epochs"): 3}))
    assert error.key == "training" and "trainer.init_args.max_epochs" in str(error)


def test_a_class_path_imports_from_the_config_folder_without_pythonpath(tmp_path: Path) -> None:
    (tmp_path / "mymodel_fh.py").write_text(
        "from digits_demo.models import DigitsClassifier\n\nclass TabMLP(DigitsClassifier):\n    pass\n"
    )
    own = {("project",): ".", ("model", "class_path"): "mymodel_fh.TabMLP"}
    config = load_config(_write(tmp_path, _with(own)))
    assert type(config.model.instantiate()).__name__ == "TabMLP"
    error = _error(tmp_path, _with({("project",): ".", ("model", "class_path"): "mymodle_fh.TabMLP"}))
    assert "cannot import 'mymodle_fh'" in str(error) and "project:" in str(error)


def test_attack_bounds_must_cover_the_data_range(tmp_path: Path) -> None:
    error = _error(tmp_path, _with({("validation", "feature_max"): 255.0}))
    assert error.key == "adversarial.bounds" and "[0, 255]" in str(error)


def test_an_unknown_init_arg_names_the_class_as_a_class_path_and_the_settings_it_takes() -> None:
    from trainguard.defenses.adversarial import AdversarialTraining
    from trainguard.pipeline.config.binding import BindError, bound_init_args

    with pytest.raises(BindError) as raised:
        bound_init_args(AdversarialTraining, {"eps": 0.1, "stpes": 3})
    assert raised.value.name == "stpes"
    assert "not an argument of trainguard.defenses.AdversarialTraining" in raised.value.message
    assert "step_size" in raised.value.message and "settings" not in raised.value.message


def _lightning_layout() -> dict[str, Any]:
    """The digits config as LightningCLI writes one: flat Trainer arguments with the callbacks among them, and the
    data module named under `data:` (tables need no decoders, so its init_args are empty)."""
    data = copy.deepcopy(BASE)
    monitor = {
        "class_path": "pytorch_lightning.callbacks.LearningRateMonitor",
        "init_args": {"logging_interval": "step"},
    }
    data["trainer"] = {**data["trainer"]["init_args"], "max_epochs": 3, "callbacks": [monitor]}
    data["data"] = {"class_path": "trainguard.provenance.VerifiedDataModule", "init_args": {}}
    del data["callbacks"]
    return data


def test_a_config_in_lightningclis_layout_loads_as_the_same_config(tmp_path: Path) -> None:
    lightning = load_config(_write(tmp_path, _lightning_layout()))
    ours = load_config(
        _write(
            tmp_path,
            _with({("trainer", "init_args", "max_epochs"): 3, ("callbacks",): lightning.resolved()["callbacks"]}),
        )
    )
    assert lightning == ours and lightning.trainer.arg("max_epochs") == 3
    assert [c.class_path for c in lightning.callbacks] == ["pytorch_lightning.callbacks.LearningRateMonitor"]
    assert lightning.trainer.instantiate(logger=False).max_epochs == 3


def test_lightningclis_layout_mixed_with_the_schemas_or_another_data_module_is_refused_naming_the_key(
    tmp_path: Path,
) -> None:
    mixed = _lightning_layout()
    mixed["trainer"]["init_args"] = {"devices": 1}
    error = _error(tmp_path, mixed)
    assert error.key == "trainer.accelerator" and "not both" in str(error)
    twice = _lightning_layout() | {"callbacks": [{"class_path": "pytorch_lightning.callbacks.LearningRateMonitor"}]}
    error = _error(tmp_path, twice)
    assert error.key == "trainer.callbacks" and "one place" in str(error)
    own = _lightning_layout() | {"data": {"class_path": "mydata.DigitsData", "init_args": {"root": "digits/"}}}
    error = _error(tmp_path, own)
    assert error.key == "data.class_path" and "trainguard.provenance.VerifiedDataModule" in str(error)
    sized = _lightning_layout()
    sized["data"]["init_args"] = {"batch_size": 32}
    error = _error(tmp_path, sized)
    assert error.key == "data.init_args.batch_size" and "training.batch_size" in str(error)
    sized["data"]["init_args"] = {"exclude_rows": {}}
    error = _error(tmp_path, sized)
    assert error.key == "data.init_args.exclude_rows" and "set by the cycle" in str(error)
    typo = _lightning_layout()
    typo["data"]["init_args"] = {"transfrom": {"class_path": "a.B"}}
    assert _error(tmp_path, typo).key == "data.transfrom"
    error = _error(tmp_path, _lightning_layout() | {"trainer": {"max_epoch": 3}})
    assert error.key == "trainer.max_epoch" and ": trainer.max_epoch: not an argument of" in str(error)


def test_dotted_overrides_set_any_section_and_the_trainers_and_models_arguments(tmp_path: Path) -> None:
    overrides = ["--trainer.max_epochs", "2", "--model.lr=0.01", "--roni.options.steps=7", "--gate.robust_eps=0.05"]
    overrides.append("--trainer.callbacks+=pytorch_lightning.callbacks.LearningRateMonitor")
    config = load_config(_write(tmp_path, _lightning_layout()), overrides=overrides)
    assert config.trainer.arg("max_epochs") == 2 and config.trainer.arg("accelerator") == "cpu"
    assert config.model.init_args["lr"] == 0.01 and config.model.init_args["channels"] == 16
    assert config.roni.options == {"steps": 7, "lr": "auto"} and config.gate.robust_eps == 0.05
    assert [c.class_path.rpartition(".")[2] for c in config.callbacks] == ["LearningRateMonitor"] * 2
    assert load_config(DIGITS, overrides=["--training.batch_size=8"]).training.batch_size == 8


@pytest.mark.parametrize(
    ("override", "key", "says"),
    [
        ("--trainer.max_epoch=1", "trainer.max_epoch", "not an argument of pytorch_lightning.Trainer"),
        ("--trainer.max_epochs=many", "trainer.max_epochs", "expected int or null, got 'many'"),
        ("--model.lr=fast", "model.lr", "expected float, got 'fast'"),
        ("--roni.levle=0.1", "roni.levle", "unknown key"),
        ("--roni.level=0.5x", "roni.level", "Input should be a valid number"),
        ("--gate.robust_eps=0.3", "gate.robust_eps", "0.3 is not among robust_eval.eps"),
        ("--trainer.logger=false", "trainer.init_args.logger", "supplied by the cycle"),
    ],
)
def test_a_bad_override_is_refused_in_one_line_naming_its_key(override: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(DIGITS, overrides=[override])
    assert caught.value.key == key and says in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{DIGITS} {override}: ")
