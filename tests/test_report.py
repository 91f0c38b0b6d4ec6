"""Seeing a study: the HTML report, the trial table (CSV, Parquet, terminal), and the servers' guard rails."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState, create_trial
from plotly.offline import get_plotlyjs
from tiny import TINY_DATA, TINY_SPACE, stored_in

from tuner import study as study_mod
from tuner.cli import main
from tuner.config import spec_from_dict
from tuner.report import (
    REPORT_ARTIFACT,
    SECTION_TITLES,
    build_report,
    check_port,
    experiment_url,
    learning_curves,
    ranked_trials,
    study_sections,
    trials_frame,
)
from tuner.study import run_study

TINY = {
    "data": TINY_DATA,
    "search_space": TINY_SPACE,
    "train": {"max_epochs": 4, "patience": 2},
    "study": {"name": "tiny-report", "n_trials": 5, "seed": 11, "pruner": "none"},
}
#: Trial states the fixture's study ends with: trial 2 pruned, trial 3 failed.
STATES = ["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "COMPLETE"]


class PruneTrialTwo(optuna.pruners.BasePruner):
    """Prunes trial 2 at its second report, nothing else."""

    def prune(self, study, trial):
        return trial.number == 2 and len(trial.intermediate_values) >= 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A finished tiny study with MLflow tracking: three completed trials, one pruned, one failed."""
    root = tmp_path_factory.mktemp("report")
    raw = stored_in(TINY, root)
    spec = spec_from_dict(raw)
    real = study_mod.evaluate
    calls = []

    def third_evaluation_is_infinite(*args, **kwargs):
        ev = real(*args, **kwargs)
        calls.append(1)
        return study_mod.Evaluation(**{**ev.__dict__, "objective": math.inf}) if len(calls) == 3 else ev

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_mod, "evaluate", third_evaluation_is_infinite)
        study = run_study(spec, pruner=PruneTrialTwo()).study
    assert [t.state.name for t in study.trials] == STATES
    return {"root": root, "spec": spec, "study": study, "storage": spec.study.storage, "raw": raw}


def cli(tiny, *args: str) -> int:
    """``tuner COMMAND STUDY --storage URL ARGS...`` on the fixture's study."""
    return main([*args[:1], tiny["spec"].study.name, "--storage", tiny["storage"], *args[1:]])


def flat(text: str) -> str:
    """Terminal output with rich's line wrapping undone."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------------------
# The report


@pytest.fixture(scope="module")
def report_html(tiny):
    out = tiny["root"] / "out" / "report.html"
    assert cli(tiny, "report", "--out", str(out)) == 0
    return out.read_text()


def test_report_has_every_section_once_plotly_embedded_once(tiny, report_html):
    for key, title in SECTION_TITLES.items():
        if key == "pareto":  # one objective: no Pareto front
            assert title not in report_html
        else:
            assert report_html.count(f"<h2>{title}</h2>") == 1, title
    # Self-contained: plotly.js inlined exactly once, nothing fetched.
    assert report_html.count(get_plotlyjs()[:500]) == 1
    rest = report_html.replace(get_plotlyjs(), "")
    assert "<script src=" not in rest and "cdn.plot.ly" not in rest
    divs = re.findall(r'<div id="(fig-[^"]+)" class="plotly-graph-div"', report_html)
    calls = re.findall(r'Plotly\.newPlot\(\s*"(fig-[^"]+)"', report_html)
    assert divs == calls and len(set(divs)) == len(divs)
    # history, intermediate, importances, parallel, slice, contour; per compared trial: learning, ROC, C-vs-E.
    for name in ("history", "intermediate", "importances", "parallel", "slice", "contour"):
        assert any(d.endswith(f"-{name}") for d in divs), name
    assert len(divs) == 6 + 2 * 3


def test_report_facts_pruned_curves_and_the_comparison(tiny, report_html):
    study = tiny["study"]
    data = study.user_attrs["tuner.data"]
    for fact in (data["data.hash"], data["data.split_sizes"], "tpe", "seed 11", "COMPLETE 3, FAIL 1, PRUNED 1"):
        assert fact in report_html, fact
    assert "wall time" in report_html
    # Pruned trials are drawn apart and end in a marker.
    assert "pruned (cut short)" in report_html and "pruned here" in report_html
    best, runner_up = ranked_trials(study)[:2]
    assert f"best: trial {best.number}</h3>" in report_html
    assert f"runner-up: trial {runner_up.number}</h3>" in report_html
    assert f"model from MLflow run {best.user_attrs['mlflow_run_id']}" in report_html
    assert "at frozen threshold" in report_html  # the operating point on the completeness-efficiency curve
    assert report_html.count("<th>TP</th><th>FP</th><th>TN</th><th>FN</th>") == 2
    # Top trials: every completed trial, none of the others.
    top = report_html.split('<section id="top">')[1]
    numbers = re.findall(r'<tr><td class="num">\d+</td><td class="num">(\d+)</td>', top)
    assert sorted(map(int, numbers)) == [t.number for t in study.trials if t.state == TrialState.COMPLETE]


def test_report_is_logged_to_the_study_parent_run(tiny, report_html):
    client = MlflowClient(tiny["spec"].tracking.uri)
    parent = tiny["study"].user_attrs["tuner.mlflow_parent_run_id"]
    assert REPORT_ARTIFACT in {a.path for a in client.list_artifacts(parent, "report")}


def test_report_default_path_and_no_mlflow(tiny, monkeypatch, capsys):
    monkeypatch.chdir(tiny["root"])
    assert cli(tiny, "report", "--no-mlflow") == 0
    assert (tiny["root"] / "reports" / "tiny-report.html").is_file()
    assert "logged to" not in capsys.readouterr().out


def in_memory_copy(tiny, trials, **user_attrs):
    """A study in memory holding the given trials and the fixture study's attributes (some replaced)."""
    study = optuna.create_study(direction="maximize", study_name="copy")
    for key, value in {**tiny["study"].user_attrs, **user_attrs}.items():
        study.set_user_attr(key, value)
    study.add_trials(trials)
    return study


def test_fewer_than_two_completed_trials_are_reported_gracefully(tiny):
    spec = tiny["spec"]
    best = ranked_trials(tiny["study"])[0]
    one = in_memory_copy(tiny, [best])
    page = build_report(one, spec).html
    assert "importances need at least 2 completed trials; this study has 1" in page
    assert "only one completed trial: no runner-up" in page
    assert f"best: trial {one.trials[0].number}</h3>" in page  # add_trials numbers the copy afresh
    pruned = [t for t in tiny["study"].trials if t.state != TrialState.COMPLETE]
    none = in_memory_copy(tiny, pruned)
    report = build_report(none, spec)
    assert report.html.count("no completed trial yet") >= 4
    assert "<h2>Top trials</h2>" in report.html


def test_a_trial_without_mlflow_model_is_replayed_from_its_seed(tiny):
    best = ranked_trials(tiny["study"])[0]
    attrs = {k: v for k, v in best.user_attrs.items() if k != "mlflow_run_id"}
    orphan = create_trial(
        value=best.value,
        params=best.params,
        distributions=best.distributions,
        user_attrs=attrs,
        intermediate_values=best.intermediate_values,
    )
    study = in_memory_copy(tiny, [orphan])
    page = build_report(study, tiny["spec"]).html
    assert "has no MLflow run (tracking was off)" in page
    assert f"replayed from seed {best.user_attrs['seed']} on the CPU" in page
    assert "-roc" in page and "-ce" in page
    assert build_report(study, tiny["spec"], replay=False).html.count("-roc") == 0


def test_data_that_changed_since_the_study_is_named_not_plotted(tiny):
    facts = {**tiny["study"].user_attrs["tuner.data"], "data.hash": "0000000000000000"}
    study = in_memory_copy(tiny, tiny["study"].trials, **{"tuner.data": facts})
    report = build_report(study, tiny["spec"])
    assert any("was run on data with hash 0000000000000000" in w for w in report.warnings)
    assert "data.source:" in report.html and "-roc" not in report.html


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_multi_objective_study_gets_a_pareto_front(tiny):
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["completeness", "contamination"])
    best = ranked_trials(tiny["study"])[0]
    for i, (comp, cont) in enumerate([(0.9, 0.1), (0.8, 0.05), (0.7, 0.2), (0.95, 0.3)]):
        params = {**best.params, "lr": 1e-3 * (i + 1)}
        study.add_trial(create_trial(values=[comp, cont], params=params, distributions=best.distributions))
    keys = [s.key for s in study_sections(study, tiny["spec"])]
    assert "pareto" in keys
    assert "<h2>Pareto front</h2>" in build_report(study, tiny["spec"], compare=False).html


def test_learning_curves_keep_their_old_call_and_take_the_objective():
    history = [{"train_loss": 1.0, "val_loss": 1.1}, {"train_loss": 0.5, "val_loss": 0.7}]
    assert len(learning_curves(history, 1, "t").data) == 2
    fig = learning_curves(history, 1, "t", {0: 0.2, 1: 0.4})
    assert len(fig.data) == 3 and fig.data[2].yaxis == "y2"


# --------------------------------------------------------------------------------------------------------------
# Every trial as a row

EXPECTED_COLUMNS = [
    "number",
    "state",
    "objective",
    "last_reported",
    "n_layers",
    "widths",
    "lr",
    "momentum",
    "dropout",
    "weight_decay",
    "batch_size",
    "optimizer",
    "activation",
    "init",
    "batch_norm",
    "max_grad_norm",
    "n_units_l0",
    "n_units_l1",
    "holdout_completeness",
    "holdout_completeness_low",
    "holdout_completeness_high",
    "holdout_contamination",
    "holdout_contamination_low",
    "holdout_contamination_high",
    "holdout_auc",
    "threshold",
    "val_completeness",
    "val_contamination",
    "val_auc",
    "val_ap",
    "epochs",
    "best_epoch",
    "gradient_health",
    "stop_reason",
    "duration_s",
    "datetime_start",
    "mlflow_run_id",
]


def test_trials_csv_has_one_row_per_trial_with_the_expected_columns(tiny, tmp_path, capsys):
    out = tmp_path / "t" / "trials.csv"
    assert cli(tiny, "trials", "--csv", str(out)) == 0
    assert "5 trial(s) of study 'tiny-report' written to" in flat(capsys.readouterr().out)
    frame = pd.read_csv(out)
    assert list(frame.columns) == EXPECTED_COLUMNS
    assert list(frame["number"]) == [0, 1, 2, 3, 4]
    assert list(frame["state"]) == STATES
    assert frame["mlflow_run_id"].notna().all() and frame["batch_size"].isin([128, 256]).all()
    complete = frame[frame["state"] == "COMPLETE"]
    assert complete["objective"].notna().all() and complete["holdout_completeness"].notna().all()
    pruned, failed = frame.iloc[2], frame.iloc[3]
    # A pruned trial has no objective (Optuna's stored value is its last report) and stopped early.
    assert math.isnan(pruned["objective"]) and not math.isnan(pruned["last_reported"])
    assert pruned["stop_reason"].startswith("pruned at epoch 1") and pruned["epochs"] == 2
    assert math.isnan(failed["objective"]) and math.isnan(failed["holdout_completeness"])
    assert failed["stop_reason"].startswith("non-finite objective")
    study = tiny["study"]
    for trial in study.trials:
        row = frame.iloc[trial.number]
        assert row["mlflow_run_id"] == trial.user_attrs["mlflow_run_id"]
        assert row["lr"] == pytest.approx(trial.params["lr"])
        # Each trial's gradient-health verdict, as recorded on the trial.
        assert row["gradient_health"] == trial.user_attrs["gradient_health"]


def test_trials_parquet_round_trips(tiny, tmp_path):
    out = tmp_path / "trials.parquet"
    assert cli(tiny, "trials", "--parquet", str(out)) == 0
    frame = pd.read_parquet(out)
    expected = trials_frame(tiny["study"], tiny["spec"])
    assert list(frame.columns) == EXPECTED_COLUMNS and len(frame) == 5
    pd.testing.assert_frame_equal(frame, expected, check_dtype=False)


def test_trials_table_shows_pruned_and_failed_trials(tiny, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    from tuner import cli as cli_mod

    monkeypatch.setattr(cli_mod.console, "width", 200)
    assert cli(tiny, "trials") == 0
    out = capsys.readouterr().out
    for text in ("COMPLETE", "PRUNED", "FAIL", "pruned at epoch 1", "non-finite objective", "5 trial(s)", "healthy"):
        assert text in out, text


def test_trials_by_study_file(tiny, tmp_path, capsys):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny["raw"]))
    assert main(["trials", str(path), "--csv", str(tmp_path / "x.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "x.csv")) == 5


# --------------------------------------------------------------------------------------------------------------
# Mistakes: exit 2, a message naming the option, the value and the rule


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("trials", "--csv", "out.parquet"), "--csv: out.parquet has a .parquet suffix but csv was asked for"),
        (("trials", "--parquet", "out.csv"), "--parquet: out.csv has a .csv suffix but parquet was asked for"),
    ],
)
def test_wrong_file_kind_is_a_user_error(tiny, capsys, args, message):
    assert cli(tiny, *args) == 2
    assert message in flat(capsys.readouterr().err)


def test_report_into_a_directory_is_a_user_error(tiny, tmp_path, capsys):
    assert cli(tiny, "report", "--out", str(tmp_path), "--no-mlflow") == 2
    assert f"--out: {tmp_path} is a directory" in flat(capsys.readouterr().err)


def test_an_output_over_the_studys_storage_study_file_catalogue_or_any_sqlite_file_is_refused(tiny, tmp_path, capsys):
    import hashlib

    import yaml

    storage = Path(tiny["storage"][len("sqlite:///") :])
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(yaml.safe_dump(tiny["raw"]))
    catalogue = tmp_path / "cat.csv"
    catalogue.write_text("u,g\n1,2\n")
    other_db = tmp_path / "other.db"
    other_db.write_bytes(storage.read_bytes())
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (storage, study_file, catalogue, other_db)}
    cases = [
        (["trials", str(study_file), "--csv", str(storage)], f"--csv: {storage} is an SQLite database"),
        (["trials", str(study_file), "--csv", str(study_file)], f"--csv: {study_file} is the study file"),
        (["report", str(study_file), "--out", str(other_db), "--no-mlflow"], f"--out: {other_db} is an SQLite"),
        (["trials", str(study_file), "--csv", ""], "--csv: must not be empty"),
        (["predict", str(tmp_path), "--data", str(catalogue), "--out", str(catalogue)], "is the --data file"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert message in flat(capsys.readouterr().err), args
    spec_file = tmp_path / "with-data.yaml"
    spec_file.write_text(yaml.safe_dump({**tiny["raw"], "data": {**tiny["raw"]["data"], "source": str(catalogue)}}))
    assert main(["report", str(spec_file), "--out", str(catalogue), "--no-mlflow"]) == 2
    assert f"--out: {catalogue} is the study's catalogue (data.source)" in flat(capsys.readouterr().err)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before


def test_an_output_over_the_catalogue_of_a_study_named_not_by_file_is_refused(tmp_path, monkeypatch):
    # Opened by name, the study's spec comes from storage, its data.source relative to a folder long gone: the
    # path the study read, kept in its facts, is what must be protected.
    import argparse
    from types import SimpleNamespace

    from tuner.cli import _refuse_overwriting
    from tuner.errors import ConfigError

    catalogue = tmp_path / "cat.csv"
    catalogue.write_text("u,g\n1,2\n")
    monkeypatch.chdir(tmp_path / "..")
    study = SimpleNamespace(user_attrs={"tuner.data": {"data.source": str(catalogue)}})
    args = argparse.Namespace(study="by-name")
    with pytest.raises(ConfigError, match="is the catalogue the study was run on"):
        _refuse_overwriting(catalogue, "--csv", args, None, study)
    _refuse_overwriting(tmp_path / "trials.csv", "--csv", args, None, study)  # another path is fine


def test_unknown_study_is_a_user_error(tiny, capsys):
    assert main(["trials", "no-such-study", "--storage", tiny["storage"]]) == 2
    assert "study 'no-such-study' not found" in flat(capsys.readouterr().err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_port_checks():
    with pytest.raises(Exception, match=r"--port: must lie in 1\.\.65535, got 0"):
        check_port("127.0.0.1", 0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port), "--tracking-uri", "sqlite:///nowhere/mlflow.db"]) == 2


def test_ui_without_a_store_says_so(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/none/mlflow.db"
    assert main(["ui", "--port", str(free_port()), "--tracking-uri", uri]) == 2
    assert "tracking.uri: no MLflow store at" in flat(capsys.readouterr().err)
    assert not (tmp_path / "none").exists()  # looking did not create one


def test_experiment_url_sorts_trials_best_first():
    assert experiment_url("http://h:1", "7") == (
        "http://h:1/#/experiments/7/runs?orderByKey=metrics.%60val_objective%60&orderByAsc=false"
    )
    assert experiment_url("http://h:1", "7", minimize=True).endswith("orderByAsc=true")


@contextlib.contextmanager
def server_process(argv: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A server started with ``argv``, its output in ``log_path``; killed afterwards if still running."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def first_answer(proc: subprocess.Popen[bytes], url: str, timeout_s: float = 10) -> str:
    """The body of ``url`` once the server answers it; "" when the process ends or a minute passes first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return str(response.read().decode())
        except OSError:
            time.sleep(0.3)  # not listening yet
    return ""


def test_dashboard_serves_the_study_until_ctrl_c(tiny, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "tuner.cli", "dashboard", "tiny-report", "--storage", tiny["storage"]]
    with server_process([*command, "--port", str(port)], tmp_path / "dashboard.log") as proc:
        body = first_answer(proc, f"http://127.0.0.1:{port}/api/studies", timeout_s=2)
        assert '"study_name": "tiny-report"' in body, (tmp_path / "dashboard.log").read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    text = (tmp_path / "dashboard.log").read_text()
    assert f"http://127.0.0.1:{port}" in text and "stopped" in text


# The dashboard's app, wrapped so that one request presses Ctrl-C while it is being served.
CTRL_C_MID_REQUEST = """
import os, signal, sys
import optuna_dashboard._app as dashboard_app
from tuner.report import serve_dashboard

make_app = dashboard_app.create_app

def create_app(*args, **kwargs):
    app = make_app(*args, **kwargs)

    def pressing_ctrl_c(environ, start_response):
        if environ["PATH_INFO"] != "/ctrl-c":
            return app(environ, start_response)
        os.kill(os.getpid(), signal.SIGINT)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"served"]

    return pressing_ctrl_c

dashboard_app.create_app = create_app
sys.exit(serve_dashboard(sys.argv[1], study_name="tiny-report", port=int(sys.argv[2])))
"""


def test_ctrl_c_while_the_dashboard_serves_a_request_stops_it(tiny, tmp_path):
    port = free_port()
    argv = [sys.executable, "-c", CTRL_C_MID_REQUEST, tiny["storage"], str(port)]
    with server_process(argv, tmp_path / "dashboard.log") as proc:
        # The request is answered, then the server stops: wsgiref used to turn the interrupt into an error page
        # and serve on.
        assert first_answer(proc, f"http://127.0.0.1:{port}/ctrl-c") == "served", (
            tmp_path / "dashboard.log"
        ).read_text()
        assert proc.wait(timeout=30) == 0
    assert "stopped" in (tmp_path / "dashboard.log").read_text()


def test_a_dashboard_server_that_fails_says_so_rather_than_stopped(tiny, monkeypatch):
    from wsgiref.simple_server import WSGIServer

    from tuner.report import serve_dashboard

    def fails(self, poll_interval=0.5):
        raise OSError("the socket went away")

    monkeypatch.setattr(WSGIServer, "serve_forever", fails)
    said: list[str] = []
    with pytest.raises(OSError, match="the socket went away"):
        serve_dashboard(tiny["storage"], study_name="tiny-report", port=free_port(), say=said.append)
    assert len(said) == 1 and "optuna-dashboard for" in said[0]
