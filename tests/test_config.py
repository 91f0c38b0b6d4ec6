"""Tests of the study file: validation messages, defaults, narrowing, fingerprints, CLI on bad files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from tuner.config import StudySpec, load_spec, spec_from_dict
from tuner.errors import ConfigError


def problems_of(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        spec_from_dict(raw)
    return info.value.problems


def one_problem(raw: Any) -> str:
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    return problems[0]


def squash(text: str) -> str:
    """Collapse whitespace (rich wraps long lines at the console width)."""
    return " ".join(text.split())


# --- defaults -----------------------------------------------------------------------------------------------


def test_defaults_from_empty_dict_and_none() -> None:
    spec = spec_from_dict({})
    assert spec == spec_from_dict(None)
    assert spec.task == "binary"
    assert spec.data.positive == "QSO"
    assert spec.data.features == ("u-g", "g-r", "r-i", "i-z")
    assert spec.objective.direction == "maximize"
    assert spec.search_space.batch_size.powers_of_two
    assert spec.data.split.train_fraction == pytest.approx(0.6)
    assert spec.data_path() is None


def test_spec_is_frozen() -> None:
    spec = spec_from_dict({})
    with pytest.raises(pydantic.ValidationError):
        spec.task = "multiclass"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        spec.study.n_trials = 3  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        spec.search_space.lr.low = 1.0  # type: ignore[misc]


def test_tracking_writes_is_one_of_four_words() -> None:
    assert spec_from_dict({}).tracking.writes == "auto"
    assert spec_from_dict({"tracking": {"writes": "inline"}}).tracking.writes == "inline"
    problem = one_problem({"tracking": {"writes": "sometimes"}})
    assert problem == "tracking.writes: Input should be 'auto', 'process', 'background' or 'inline', got 'sometimes'"


def test_not_a_mapping() -> None:
    assert "mapping" in one_problem([1, 2])


# --- one mistake, one message naming key, value and rule ----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "needles"),
    [
        (
            {"search_space": {"wieght_decay": {"low": 1e-5, "high": 1e-2}}},
            ["'wieght_decay'", "search_space", "did you mean 'weight_decay'"],
        ),
        ({"serach_space": {}}, ["'serach_space'", "did you mean 'search_space'"]),
        ({"data": {"split": {"trian": 0.6}}}, ["'trian'", "data.split", "did you mean 'train'"]),
        (
            {"search_space": {"lr": {"low": 0.1, "high": 0.01}}},
            ["search_space.lr: low must be < high, got low=0.1, high=0.01"],
        ),
        (
            {"search_space": {"lr": {"low": 0, "high": 0.01, "log": True}}},
            ["search_space.lr:", "log range needs low > 0", "low=0"],
        ),
        (
            {"search_space": {"weight_decay": {"low": -1.0, "high": 0.01, "log": True}}},
            ["search_space.weight_decay:", "log range needs low > 0", "low=-1"],
        ),
        (
            {"search_space": {"optimizer": {"choices": []}}},
            ["search_space.optimizer:", "must not be empty", "[]"],
        ),
        (
            {"search_space": {"optimizer": {"choices": ["adam", "adamm"]}}},
            ["search_space.optimizer:", "unknown choice 'adamm'", "did you mean 'adam'"],
        ),
        (
            {"search_space": {"activation": "rellu"}},
            ["search_space.activation:", "unknown choice 'rellu'", "did you mean 'relu'"],
        ),
        ({"train": {"patience": -1}}, ["train.patience:", "greater than or equal to 0", "-1"]),
        (
            {"data": {"split": {"validation": 0.5, "holdout": 0.5}}},
            ["data.split:", "validation + holdout must be < 1", "validation=0.5", "holdout=0.5"],
        ),
        (
            {"data": {"split": {"validation": 0.6, "holdout": 0.7}}},
            ["data.split:", "validation + holdout must be < 1", "validation=0.6", "holdout=0.7"],
        ),
        (
            # 0.7 + 0.3 is 0.9999999999999999 in floating point: still no rows left for training.
            {"data": {"split": {"validation": 0.7, "holdout": 0.3}}},
            ["data.split:", "validation + holdout must be < 1", "validation=0.7", "holdout=0.3"],
        ),
        (
            {"data": {"split": {"train": 0.5, "validation": 0.2, "holdout": 0.2}}},
            ["data.split:", "must sum to 1", "train=0.5", "validation=0.2", "holdout=0.2"],
        ),
        (
            {"study": {"sampler": "tpee"}},
            ["study.sampler:", "unknown sampler 'tpee'", "did you mean 'tpe'"],
        ),
        (
            {"study": {"pruner": "medain"}},
            ["study.pruner:", "unknown pruner 'medain'", "did you mean 'median'"],
        ),
        ({"data": {"positive": None}}, ["data.positive:", "binary task needs the positive class", "null"]),
        (
            {"data": {"positive": None}, "objective": {"metric": "roc_auc"}},
            ["data.positive:", "binary task", "null"],
        ),
        (
            {"task": "multiclass", "data": {"positive": None}},
            ["data.positive:", "completeness_at_contamination", "null"],
        ),
        (
            {"task": "multiclass", "data": {"positive": None}, "objective": {"metric": "roc_auc"}},
            ["data.positive:", "objective roc_auc scores one class against the rest", "val_loss"],
        ),
        (
            {
                "task": "multiclass",
                "data": {"positive": None},
                "objective": {"metric": "val_loss"},
                "train": {"monitor": "val_auc"},
            },
            ["data.positive:", "train.monitor val_auc", "null"],
        ),
        ({"data": {"seed": -1}}, ["data.seed:", "-1"]),
        ({"study": {"seed": -3}}, ["study.seed:", "-3"]),
        ({"study": {"n_trials": 0}}, ["study.n_trials:", "greater than or equal to 1", "0"]),
        (
            {"search_space": {"momentum": {"low": 0.5, "high": 1.0}}},
            ["search_space.momentum:", "[0, 1)", "high=1"],
        ),
        ({"search_space": {"n_layers": {"low": 0, "high": 3}}}, ["search_space.n_layers:", ">= 1", "0"]),
        ({"data": {"features": ["u-g", "u-g"]}}, ["data.features:", "must not repeat", "u-g"]),
        ({"data": {"features": []}}, ["data.features:", "at least one feature"]),
        ({"search_space": {"lr": {"value": 0}}}, ["search_space.lr:", "must be > 0", "low=0"]),
        ({"search_space": {"n_layers": True}}, ["search_space.n_layers:", "must be a number, got True"]),
        ({"search_space": {"lr": {"low": True, "high": 0.1}}}, ["search_space.lr.low:", "must be a number"]),
        ({"study": {"name": "a/../../b"}}, ["study.name:", "file name", "'a/../../b'"]),
        ({"study": {"name": ".."}}, ["study.name:", "file name", "'..'"]),
        (
            {"data": {"features": ["u-g", "ra"], "id_columns": ["ra", "dec"]}},
            ["data.id_columns:", "['ra']", "also in data.features"],
        ),
        ({"data": {"features": ["u-g", "class"]}}, ["data.features:", "['class']", "the target is read from"]),
        (
            {"task": "regression", "data": {"target": "redshift", "positive": None, "features": ["u-g", "redshift"]}},
            ["data.features:", "['redshift']", "the target is read from"],
        ),
        ({"data": {"features": ["u-g", "redshift"], "target": "redshift>1"}}, ["data.features:", "['redshift']"]),
        ({"train": {"pos_weight": "balancedd"}}, ["train.pos_weight:", "> 0, 'balanced' or null", "'balancedd'"]),
        ({"train": {"pos_weight": -1}}, ["train.pos_weight:", "> 0", "-1"]),
        ({"study": {"engine": "eager", "pack": 4}}, ["study.engine: the eager engine", "pack=4"]),
    ],
)
def test_single_mistake_message(raw: dict[str, Any], needles: list[str]) -> None:
    message = one_problem(raw)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1])
def test_target_contamination_outside_open_interval(value: float) -> None:
    message = one_problem({"objective": {"target_contamination": value}})
    assert message.startswith("objective.target_contamination:")
    assert "(0, 1)" in message
    assert f"got {float(value)}" in message


@pytest.mark.parametrize("value", [0.01, 0.5, 0.99])
def test_target_contamination_inside(value: float) -> None:
    spec = spec_from_dict({"objective": {"target_contamination": value}})
    assert spec.objective.target_contamination == value


BAD = {
    "serach_space": {},
    "search_space": {
        "lr": {"low": 0.1, "high": 0.01},
        "wieght_decay": {"low": 1e-5, "high": 1e-2},
        "optimizer": {"choices": []},
        "batch_size": {"low": 10, "high": 1024, "powers_of_two": True},
    },
    "train": {"patience": -1},
    "data": {"split": {"validation": 0.5, "holdout": 0.5}},
    "study": {"sampler": "tpee", "pruner": "medain"},
    "objective": {"target_contamination": 1.5},
}
BAD_NEEDLES = [
    "'serach_space'",
    "search_space.lr: low must be < high",
    "'wieght_decay'",
    "search_space.optimizer: choices must not be empty",
    "search_space.batch_size: low must be a power of two",
    "train.patience",
    "data.split: validation + holdout must be < 1",
    "unknown sampler 'tpee'",
    "unknown pruner 'medain'",
    "objective.target_contamination",
]


def test_all_mistakes_reported_at_once() -> None:
    problems = problems_of(BAD)
    assert len(problems) == len(BAD_NEEDLES), problems
    for needle in BAD_NEEDLES:
        assert sum(needle in p for p in problems) == 1, (needle, problems)


def test_every_rule_across_sections_is_reported_at_once() -> None:
    # Each section is valid on its own; three rules across them are broken.
    problems = problems_of(
        {
            "task": "regression",
            "data": {"positive": "QSO"},
            "validation": {"k": 5},
            "study": {"pruner": "wilcoxon"},
        }
    )
    assert [p.split(":", 1)[0] for p in problems] == ["data.positive", "validation.k", "study.pruner"], problems
    assert "got 'QSO'" in problems[0] and "got k=5" in problems[1] and "got wilcoxon" in problems[2]


def test_load_spec_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(BAD))
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    text = str(info.value)
    assert str(path) in text
    assert f"({len(BAD_NEEDLES)} problems)" in text
    assert len(info.value.problems) == len(BAD_NEEDLES)
    for needle in BAD_NEEDLES:
        assert needle in text, needle


# --- fixed values, narrowing, powers of two -----------------------------------------------------------------


def test_fixed_values_and_narrowing() -> None:
    spec = spec_from_dict(
        {
            "search_space": {
                "momentum": 0.9,
                "n_layers": {"low": 2, "high": 3},
                "optimizer": "adam",
                "batch_norm": False,
                "batch_size": 256,
                "lr": {"low": 1e-3, "high": 1e-2, "log": True},
            }
        }
    )
    space = spec.search_space
    assert space.momentum.fixed and space.momentum.value == 0.9
    assert (space.n_layers.low, space.n_layers.high, space.n_layers.fixed) == (2, 3, False)
    assert space.optimizer.fixed and space.optimizer.options == ("adam",)
    assert space.batch_norm.fixed and space.batch_norm.options == (False,)
    assert space.batch_size.fixed and space.batch_size.value == 256
    assert (space.lr.low, space.lr.high, space.lr.log) == (1e-3, 1e-2, True)
    # untouched entries keep their defaults
    assert space.width == StudySpec().search_space.width


@pytest.mark.parametrize(
    ("batch_size", "needle"),
    [
        ({"low": 10, "high": 1024, "powers_of_two": True}, "low=10"),
        ({"low": 16, "high": 1000, "log": True, "powers_of_two": True}, "high=1000"),
        ({"value": 100, "powers_of_two": True}, "value=100"),
    ],
)
def test_powers_of_two_rejects_other_bounds(batch_size: dict[str, Any], needle: str) -> None:
    message = one_problem({"search_space": {"batch_size": batch_size}})
    assert message.startswith("search_space.batch_size:")
    assert "power of two" in message and needle in message


def test_powers_of_two_accepts_powers() -> None:
    p = spec_from_dict({"search_space": {"batch_size": {"low": 32, "high": 512, "powers_of_two": True}}})
    assert (p.search_space.batch_size.low, p.search_space.batch_size.high) == (32, 512)


def test_fixed_value_with_range_rejected() -> None:
    message = one_problem({"search_space": {"lr": {"low": 0.001, "high": 0.1, "value": 0.01}}})
    assert message.startswith("search_space.lr:") and "not both" in message


# --- load_spec ----------------------------------------------------------------------------------------------


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("study:\n  n_trials: [1, 2\n  name: x\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert "not valid YAML" in str(info.value)
    assert str(path) in str(info.value)


def test_a_study_file_not_in_utf8_is_one_message(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert str(info.value) == f"invalid study file {path}: not a text file in UTF-8: byte 0xff at offset 1 is not UTF-8"


def test_a_section_rule_is_named_once() -> None:
    # The rule's own key, not its section's name in front of it ("study: study.engine: ...").
    assert one_problem({"study": {"engine": "eager", "pack": 4}}).startswith("study.engine: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert "not found" in str(info.value) and "nowhere.yaml" in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["", "search_space:\n  momentum: 0.9\n", "study:\n  n_trials: 3\n"],
    ids=["empty", "no-study-section", "study-without-name"],
)
def test_study_name_defaults_to_file_stem(tmp_path: Path, text: str) -> None:
    path = tmp_path / "qso-search.yaml"
    path.write_text(text)
    spec = load_spec(path)
    assert spec.study.name == "qso-search"
    assert Path(spec.base_dir) == tmp_path.resolve()


def test_explicit_study_name_kept_and_data_path_relative_to_file(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("study:\n  name: mine\ndata:\n  source: cat.csv\n")
    spec = load_spec(path)
    assert spec.study.name == "mine"
    assert spec.data_path() == tmp_path.resolve() / "cat.csv"


# --- fingerprint and overrides ------------------------------------------------------------------------------


def test_fingerprint_tracks_search_space_not_budget() -> None:
    base = spec_from_dict({})
    sections = ("search_space", "data", "objective")
    fp = base.fingerprint(*sections)
    assert fp == spec_from_dict({}).fingerprint(*sections)
    assert base.with_overrides({"study.n_trials": 500}).fingerprint(*sections) == fp
    assert spec_from_dict({"study": {"n_trials": 3}}).fingerprint(*sections) == fp
    assert spec_from_dict({"search_space": {"momentum": 0.9}}).fingerprint(*sections) != fp
    narrowed = spec_from_dict({"search_space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}})
    assert narrowed.fingerprint(*sections) != fp
    assert base.with_overrides({"search_space.dropout": 0.0}).fingerprint(*sections) != fp


def test_with_overrides_applies_and_keeps_the_rest() -> None:
    spec = spec_from_dict({"search_space": {"momentum": 0.9}, "study": {"name": "x"}}, base_dir="/some/dir")
    new = spec.with_overrides({"study.n_trials": 7, "tracking.enabled": False, "study.storage": "sqlite:///o.db"})
    assert (new.study.n_trials, new.tracking.enabled, new.study.storage) == (7, False, "sqlite:///o.db")
    assert new.study.name == "x"
    assert new.search_space == spec.search_space
    assert new.base_dir == "/some/dir"
    assert spec.study.n_trials == 20  # the original is unchanged


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"study.n_trials": 0}, "study.n_trials"),
        ({"study.sampler": "tpee"}, "did you mean 'tpe'"),
        ({"objective.target_contamination": 1.0}, "objective.target_contamination"),
        ({"study.n_trails": 5}, "did you mean 'n_trials'"),
        ({"studdy.n_trials": 5}, "did you mean 'study'"),
        ({"study.n_trials.x": 5}, "study.n_trials"),
    ],
)
def test_with_overrides_validates(override: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        spec_from_dict({}).with_overrides(override)
    assert needle in str(info.value)


# --- the CLI stops before creating anything -----------------------------------------------------------------


def _bad_file(tmp_path: Path) -> tuple[Path, list[Path]]:
    optuna_db = tmp_path / "store" / "optuna.db"
    mlflow_db = tmp_path / "track" / "mlflow.db"
    raw = {
        **BAD,
        "study": {**BAD["study"], "storage": f"sqlite:///{optuna_db}"},
        "tracking": {"uri": f"sqlite:///{mlflow_db}", "artifact_location": str(tmp_path / "artifacts")},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, [optuna_db, mlflow_db, optuna_db.parent, mlflow_db.parent, tmp_path / "artifacts"]


@pytest.mark.parametrize("command", ["run", "validate"])
def test_cli_bad_file_exits_2_and_creates_nothing(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    path, never = _bad_file(tmp_path)
    assert main([command, str(path)]) == 2
    captured = capsys.readouterr()
    err = squash(captured.err)
    assert f"({len(BAD_NEEDLES)} problems)" in err
    for needle in BAD_NEEDLES:
        assert squash(needle) in err, needle
    for p in never:
        assert not p.exists(), p
    # nothing else either: no default optuna.db or mlruns/ in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_cli_bad_data_is_one_message_on_stderr_and_nothing_on_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.csv").write_text("u,g,r,i,z,class\n" + "\n".join(f"{i},1,1,1,1,STAR" for i in range(20)) + "\n")
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"data": {"source": "cat.csv", "features": ["u-g", "redshfit"]}}))
    assert main(["run", str(study)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "data.features: column 'redshfit' not in the catalogue" in squash(captured.err)


def test_cli_missing_file_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--study-name", ""], "--study-name: must not be empty (it sets study.name)"),
        (["--storage", " "], "--storage: must not be empty (it sets study.storage)"),
        (["--no-tracking", "--tracking-uri", "sqlite:///x.db"], "--no-tracking and --tracking-uri contradict"),
        (["--tracking-uri", "http://127.0.0.1:1"], "no server accepts connections at 127.0.0.1:1"),
    ],
)
def test_cli_empty_contradictory_or_unreachable_flags_exit_2_and_create_nothing(
    flags: list[str], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump({"data": {"simulated": {"n_star": 300, "n_quasar": 60}}, "study": {"n_trials": 1}}))
    assert main(["run", str(path), *flags]) == 2
    err = squash(capsys.readouterr().err)
    assert needle in err, err
    assert err.count("error:") == 1
    # no study file, no lock beside it, no MLflow store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.yaml"]


# --- non-finite numbers, Optuna options, names, URIs, repeated keys -----------------------------------------


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ({"lr": math.nan}, "search_space.lr: must be a finite number, got nan"),
        ({"lr": math.inf}, "search_space.lr: must be a finite number, got inf"),
        ({"momentum": math.nan}, "search_space.momentum: must be a finite number, got nan"),
        ({"weight_decay": math.inf}, "search_space.weight_decay: must be a finite number, got inf"),
        ({"l1": {"value": math.inf}}, "search_space.l1: must be a finite number, got inf"),
        ({"max_grad_norm": -math.inf}, "search_space.max_grad_norm: must be a finite number, got -inf"),
        # dropout nan trained: every comparison with NaN is false, so no range rule caught it.
        ({"dropout": math.nan}, "search_space.dropout: must be a finite number, got nan"),
        ({"batch_norm": math.nan}, "search_space.batch_norm: must be a finite number, got nan"),
        (
            {"optimizer": {"choices": ["adam", math.nan]}},
            "search_space.optimizer: must be a finite number, got nan among choices ['adam', nan]",
        ),
        ({"lr": {"low": math.nan, "high": 0.1}}, "search_space.lr: low and high must be finite, got low=nan, high=0.1"),
    ],
)
def test_search_space_numbers_must_be_finite(entries: dict[str, Any], problem: str) -> None:
    assert one_problem({"search_space": entries}) == problem


def test_huber_delta_must_be_finite() -> None:
    raw = {
        "task": "regression",
        "data": {"target": "redshift"},
        "search_space": {"loss": "huber", "huber_delta": math.nan},
    }
    assert one_problem(raw) == "search_space.huber_delta: must be a finite number, got nan"


def test_warm_start_numbers_must_be_finite() -> None:
    from tuner.study import check_spec

    spec = spec_from_dict({"study": {"enqueue": [{"lr": math.nan, "dropout": 0.1}]}})
    with pytest.raises(ConfigError) as info:
        check_spec(spec, [{"momentum": math.inf}])
    assert info.value.problems == [
        "study.enqueue[0].lr: must be a finite number, got nan",
        "--enqueue entry 0.momentum: must be a finite number, got inf",
    ]


def option_problems(study: dict[str, Any]) -> list[str]:
    from tuner.study import check_spec

    with pytest.raises(ConfigError) as info:
        check_spec(spec_from_dict({"study": study}))
    return info.value.problems


@pytest.mark.parametrize(
    ("study", "problem"),
    [
        # Each of these was accepted and broke the study after its first trial (or never judged a trial).
        (
            {"sampler_options": {"n_startup_trials": 1, "n_ei_candidates": 0}},
            "study.sampler_options.n_ei_candidates: must be >= 1, got 0 (the tpe sampler)",
        ),
        (
            {"sampler_options": {"n_startup_trials": -1}},
            "study.sampler_options.n_startup_trials: must be >= 0, got -1 (the tpe sampler)",
        ),
        (
            {"sampler_options": {"prior_weight": math.nan}},
            "study.sampler_options.prior_weight: must be a finite number, got nan (the tpe sampler)",
        ),
        (
            {"sampler": "cmaes", "sampler_options": {"popsize": -3}},
            "study.sampler_options.popsize: must be >= 2, got -3 (the cmaes sampler)",
        ),
        (
            {"sampler": "cmaes", "sampler_options": {"sigma0": -1}},
            "study.sampler_options.sigma0: must be > 0, got -1 (the cmaes sampler)",
        ),
        (
            {"sampler": "gp", "sampler_options": {"n_startup_trials": -5}},
            "study.sampler_options.n_startup_trials: must be >= 0, got -5 (the gp sampler)",
        ),
        (
            {"sampler": "nsga2", "sampler_options": {"crossover_prob": 1.5}},
            "study.sampler_options.crossover_prob: must lie in [0, 1], got 1.5 (the nsga2 sampler)",
        ),
        (
            {"sampler_options": {"seed": 3}},
            "study.sampler_options.seed: the sampler is seeded with study.seed, got 3; set study.seed instead "
            "(the tpe sampler)",
        ),
        (
            {"pruner_options": {"n_warmup_steps": -1}},
            "study.pruner_options.n_warmup_steps: must be >= 0, got -1 (the median pruner)",
        ),
        (
            {"pruner_options": {"interval_steps": 0}},
            "study.pruner_options.interval_steps: must be >= 1, got 0 (the median pruner)",
        ),
        (
            {"pruner": "percentile", "pruner_options": {"percentile": 150}},
            "study.pruner_options.percentile: must lie in [0, 100], got 150 (the percentile pruner)",
        ),
        (
            {"pruner": "successive_halving", "pruner_options": {"min_resource": 0}},
            "study.pruner_options.min_resource: must be an integer >= 1 or auto, got 0 (the successive_halving pruner)",
        ),
        (
            {"pruner": "successive_halving", "pruner_options": {"reduction_factor": 1}},
            "study.pruner_options.reduction_factor: must be >= 2, got 1 (the successive_halving pruner)",
        ),
        (
            # Hyperband keeps these and divides by log(reduction_factor) when it first prunes.
            {"pruner": "hyperband", "pruner_options": {"reduction_factor": 1}},
            "study.pruner_options.reduction_factor: must be >= 2, got 1 (the hyperband pruner)",
        ),
        (
            {"pruner": "hyperband", "pruner_options": {"max_resource": "lots"}},
            "study.pruner_options.max_resource: must be an integer >= 1 or auto, got 'lots' (the hyperband pruner)",
        ),
    ],
)
def test_sampler_and_pruner_options_out_of_range(study: dict[str, Any], problem: str) -> None:
    assert option_problems(study) == [problem]


@pytest.mark.parametrize(
    ("study", "problem"),
    [
        (
            {"sampler_options": {"constraints_func": "lambda t: 1"}},
            "study.sampler_options.constraints_func: cannot be set from a study file (Optuna expects a Python "
            "function), got 'lambda t: 1' (the tpe sampler)",
        ),
        (
            {"sampler_options": {"gamma": 0.5}},
            "study.sampler_options.gamma: cannot be set from a study file (Optuna expects a Python function), "
            "got 0.5 (the tpe sampler)",
        ),
        (
            {"sampler": "qmc", "sampler_options": {"independent_sampler": "random"}},
            "study.sampler_options.independent_sampler: cannot be set from a study file (Optuna expects a Python "
            "object, BaseSampler), got 'random' (the qmc sampler)",
        ),
    ],
)
def test_options_optuna_takes_as_python_functions_are_refused(study: dict[str, Any], problem: str) -> None:
    assert option_problems(study) == [problem]


@pytest.mark.parametrize(
    "study",
    [
        {"sampler_options": {"n_startup_trials": 0, "n_ei_candidates": 1, "gamma": None}},
        {"sampler": "cmaes", "sampler_options": {"popsize": 2, "n_startup_trials": 1}},
        {"pruner": "successive_halving", "pruner_options": {"min_resource": "auto", "reduction_factor": 2}},
        {"pruner": "hyperband", "pruner_options": {"min_resource": 1, "max_resource": "auto"}},
        {"pruner": "percentile", "pruner_options": {"percentile": 0.0}},
    ],
)
def test_options_at_their_bounds_are_accepted(study: dict[str, Any]) -> None:
    from tuner.study import check_spec

    assert check_spec(spec_from_dict({"study": study})) == []


def test_study_name_must_leave_room_for_the_file_names_it_makes() -> None:
    problem = one_problem({"study": {"name": "n" * 300}})
    assert problem.startswith("study.name: must be at most 200 bytes in UTF-8"), problem
    assert "got 300 bytes: 'nnnnnnnnnnnnnnnnnnnnnnnn'..." in problem
    assert "reports/NAME.html" in problem and "exports/NAME-trial-N" in problem
    # Bytes, not characters: 101 two-byte letters are 202 bytes.
    assert "got 202 bytes" in one_problem({"study": {"name": "é" * 101}})
    assert spec_from_dict({"study": {"name": "é" * 100}}).study.name == "é" * 100


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            {"tracking": {"uri": ""}},
            "tracking.uri: must not be empty (MLflow would fall back to its default, a folder in the working "
            "directory), got ''; leave the key out for tuner's default",
        ),
        (
            {"tracking": {"artifact_location": " "}},
            "tracking.artifact_location: must not be empty (MLflow would fall back to its default, a folder in the "
            "working directory), got ' '; leave the key out for tuner's default",
        ),
        (
            {"study": {"storage": ""}},
            "study.storage: must not be empty: give a storage URL such as sqlite:///optuna.db, got ''",
        ),
        ({"data": {"source": ""}}, "data.source: must not be empty: give simulated or a catalogue file, got ''"),
    ],
)
def test_empty_locations_are_refused(raw: dict[str, Any], problem: str) -> None:
    assert one_problem(raw) == problem


def test_a_simulated_catalogue_of_one_class_names_its_section() -> None:
    assert one_problem({"data": {"simulated": {"n_star": 0, "n_quasar": 0}}}) == (
        "data.simulated: at least two of n_star, n_quasar, n_galaxy must be > 0 (one class alone is no "
        "classification problem), got n_star=0, n_quasar=0, n_galaxy=0"
    )
    # The section is unused with a catalogue file.
    assert spec_from_dict({"data": {"source": "cat.csv", "simulated": {"n_star": 0, "n_quasar": 0}}})


def test_id_columns_must_not_repeat() -> None:
    assert one_problem({"data": {"id_columns": ["ra", "dec", "ra"]}}) == (
        "data.id_columns: id_columns must not repeat, got ['ra'] more than once"
    )


def test_where_range_bounds_must_be_finite() -> None:
    problem = one_problem({"data": {"where": {"redshift": {"min": math.nan, "max": 1}}}})
    assert "where.redshift: min and max must be finite numbers" in problem and "min=nan" in problem


def test_repeated_yaml_keys_are_refused_with_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        "train: {max_epochs: 2}\n"
        "train: {max_epochs: 3}\n"
        "study:\n"
        "  n_trials: 1\n"
        "  seed: 0\n"
        "  n_trials: 2\n"
        "  enqueue:\n"
        "    - {lr: 0.01, lr: 0.02}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert info.value.problems == [
        "train: the key is given twice (lines 1 and 2), and YAML would keep the last one without a word; give it once",
        "study.n_trials: the key is given twice (lines 4 and 6), and YAML would keep the last one without a word; "
        "give it once",
        "study.enqueue[0].lr: the key is given twice (line 8), and YAML would keep the last one without a word; "
        "give it once",
    ]


def test_yaml_anchors_and_merge_keys_are_not_repeats(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("x-base: &base {low: 0.001, high: 0.1}\nsearch_space:\n  lr: {<<: *base, log: true}\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert info.value.problems == ["unknown key 'x-base' in the study file"]  # the merge itself was read


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"search_space": {"lr": math.nan}}, "search_space.lr: must be a finite number, got nan"),
        ({"study": {"enqueue": [{"lr": math.nan}]}}, "study.enqueue[0].lr: must be a finite number, got nan"),
        (
            {"study": {"sampler_options": {"n_ei_candidates": 0}}},
            "study.sampler_options.n_ei_candidates: must be >= 1, got 0 (the tpe sampler)",
        ),
        ({"study": {"sampler_options": {"gamma": 0.5}}}, "study.sampler_options.gamma: cannot be set from a study"),
        ({"study": {"name": "n" * 300}}, "study.name: must be at most 200 bytes"),
        ({"tracking": {"uri": ""}}, "tracking.uri: must not be empty"),
    ],
)
def test_cli_run_refuses_them_with_exit_2_and_creates_nothing(
    raw: dict[str, Any],
    needle: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    base: dict[str, Any] = {"data": {"simulated": {"n_star": 300, "n_quasar": 60}}, "study": {"n_trials": 1}}
    path.write_text(
        yaml.safe_dump({**base, **raw, "study": {**base["study"], **raw.get("study", {})}}, allow_unicode=True)
    )
    assert main(["run", str(path)]) == 2
    err = squash(capsys.readouterr().err)
    assert needle in err, err
    assert err.count("error:") == 1
    # no study storage (optuna.db), no MLflow store (mlruns/)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_cli_run_refuses_a_repeated_key_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text("data: {simulated: {n_star: 300, n_quasar: 60}}\ntrain: {max_epochs: 2}\ntrain: {max_epochs: 3}\n")
    assert main(["run", str(path)]) == 2
    assert "train: the key is given twice (lines 2 and 3)" in squash(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"data": {"split": {"train": float("nan"), "validation": 0.2, "holdout": 0.2}}}, "data.split.train"),
        ({"train": {"min_delta": float("inf")}}, "train.min_delta"),
    ],
)
def test_a_split_fraction_or_min_delta_that_is_not_finite_is_refused(raw, key):
    with pytest.raises(ConfigError) as info:
        spec_from_dict(raw)
    assert key in str(info.value) and "finite number" in str(info.value)
