"""What a person sees: the study report and the MLflow UI, rendered by headless Chromium.

Marked ``browser``: they need Debian's Chromium at /usr/bin/chromium. Without it they skip, with the reason,
except under CI (``CI`` set), where a missing browser is a failure: ``.ci/run`` installs it. Screenshots are
kept in ``test-artifacts/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny import TINY_DATA, stored_in

from tuner.config import spec_from_dict
from tuner.report import SECTION_TITLES, experiment_url
from tuner.study import run_study

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SMALL = {
    "data": TINY_DATA,
    "search_space": {
        "n_layers": {"low": 1, "high": 2},
        "width": {"low": 8, "high": 32, "log": True},
        "lr": {"low": 1e-3, "high": 3e-2, "log": True},
        "batch_size": 128,
        "optimizer": "adam",
    },
    "train": {"max_epochs": 3, "patience": 2},
    "study": {"name": "tiny-browser", "n_trials": 3, "seed": 5, "pruner": "none"},
}


@pytest.fixture(scope="module")
def chromium() -> Path:
    """The browser, or a skip (a failure under CI) that says what is missing."""
    if CHROMIUM.is_file():
        return CHROMIUM
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI is set but {CHROMIUM} is missing; .ci/run installs it with apt-get install chromium")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y --no-install-recommends chromium)")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A finished three-trial study tracked in its own SQLite MLflow store."""
    root = tmp_path_factory.mktemp("browser")
    spec = spec_from_dict(stored_in(SMALL, root))
    study = run_study(spec).study
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    return {"root": root, "spec": spec, "study": study}


def headless(chromium: Path, url: str, profile: Path, *options: str, timeout: float = 180) -> tuple[str, str]:
    """Load ``url`` in headless Chromium; return (stdout, stderr). Console messages are logged to stderr."""
    command = [
        str(chromium),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={profile}",
        *options,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    return done.stdout, done.stderr


def console_errors(stderr: str) -> list[str]:
    """Uncaught exceptions and console errors the page logged."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line and re.search(r"Uncaught|Error", line)]


def keep(path: Path) -> Path:
    """Copy a screenshot into test-artifacts/ for a person to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    return Path(shutil.copy(path, ARTIFACTS / path.name))


def test_report_renders_every_section_and_figure_without_js_errors(chromium, small, tmp_path):
    from tuner.cli import main

    page = tmp_path / "report.html"
    assert main(["report", "tiny-browser", "--storage", small["spec"].study.storage, "--out", str(page)]) == 0
    dom, stderr = headless(chromium, page.as_uri(), tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom")
    assert not console_errors(stderr), console_errors(stderr)
    for key, title in SECTION_TITLES.items():
        if key != "pareto":
            assert f"<h2>{title}</h2>" in dom, title
    graphs = re.findall(r'<div id="fig-[^"]+" class="([^"]*plotly-graph-div[^"]*)"', dom)
    assert len(graphs) == 12
    # Plotly ran: it marks each div as plotted and draws its SVG into it.
    assert all("js-plotly-plot" in classes for classes in graphs), graphs
    assert dom.count('class="main-svg"') >= len(graphs)
    shot = tmp_path / "report.png"
    headless(
        chromium,
        page.as_uri(),
        tmp_path / "profile-shot",
        "--virtual-time-budget=10000",
        "--window-size=1400,6500",
        f"--screenshot={shot}",
    )
    assert shot.stat().st_size > 50_000
    keep(shot)


def test_a_trials_plots_render_with_their_marked_lines(chromium, tmp_path):
    """A trial's plots are written from plain figure specs, without plotly's validation: the browser is the check."""
    import numpy as np

    from tuner.report import regression_artifacts, trial_artifacts

    rng = np.random.default_rng(0)
    history = [{"train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1)} for e in range(6)]
    y, score = rng.random(300) < 0.2, rng.random(300)
    pages = {
        **trial_artifacts(history, 3, {"holdout": (y, score)}, {"holdout": (0.8, 0.1)}, 0.1, "t", "embed"),
        **regression_artifacts(history, 3, {"holdout": (score, score + 0.1)}, "z", "t", "embed"),
    }
    assert len(pages) == 4
    doms = {}
    for name, text in pages.items():
        page = tmp_path / name.replace("/", "_")
        page.write_text(text)
        profile = tmp_path / f"profile-{page.stem}"
        doms[name], stderr = headless(chromium, page.as_uri(), profile, "--virtual-time-budget=5000", "--dump-dom")
        assert not console_errors(stderr), (name, console_errors(stderr))
        assert "js-plotly-plot" in doms[name] and 'class="main-svg"' in doms[name], name
    # The marked lines are drawn with their labels: the restored epoch, the target efficiency.
    assert "restored epoch 3" in doms["plots/learning_curves.html"]
    assert "target efficiency" in doms["plots/completeness_efficiency.html"]
    assert "holdout (AUC" in doms["plots/roc.html"] and "holdout (RMSE" in doms["plots/predicted_vs_true.html"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with status {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds:.0f} s")


def test_mlflow_ui_lists_the_trials(chromium, small, tmp_path):
    spec, study = small["spec"], small["study"]
    port = free_port()
    log_path = tmp_path / "ui.log"
    log = log_path.open("w")
    command = [sys.executable, "-m", "tuner.cli", "ui", "tiny-browser", "--storage", spec.study.storage]
    proc = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # MLflow's server takes half a minute to start on two cores.
        wait_for(f"{base}/health", proc, 180)
        said = log_path.read_text()
        printed = re.search(r"(http://\S+)", said)
        assert printed is not None, said
        url = printed.group(1)
        experiment_id = re.search(r"/experiments/(\d+)/", url)
        assert experiment_id is not None and url == experiment_url(base, experiment_id.group(1))

        # The REST call the runs page makes lists every trial's run.
        request = urllib.request.Request(
            f"{base}/ajax-api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment_id.group(1)], "max_results": 100}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = json.load(response)["runs"]
        names = {r["info"]["run_name"] for r in runs}
        expected = {f"trial-{t.number:04d}" for t in study.trials}
        assert expected | {"tiny-browser"} == names

        # And the page itself shows them (a JS app: give it virtual time to fetch and draw).
        shot = tmp_path / "mlflow-ui.png"
        dom = ""
        for attempt in range(3):
            dom, _ = headless(
                chromium,
                url,
                tmp_path / f"profile-{attempt}",
                "--virtual-time-budget=25000",
                "--window-size=1400,1000",
                f"--screenshot={shot}",
                "--dump-dom",
            )
            if all(name in dom for name in expected):
                break
        missing = sorted(name for name in expected if name not in dom)
        assert not missing, f"not on the page: {missing}"
        if shot.exists():
            keep(shot)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", port))  # the server is gone, not left running
