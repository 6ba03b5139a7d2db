"""``lrlab tune``: real ``lrlab`` worker processes sharing one Optuna study through a journal file
and through a real PostgreSQL server (started here in a temporary folder, on a local socket
only), a worker killed mid-trial, the budget's slots, and the bad-input one-liners.

Tiny recipe: fastnet width 0.25 on 200 training images of real CIFAR-10, 2 epochs of 4 steps,
no explain stage (``lrlab tune`` trials never explain).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial
from optuna.distributions import FloatDistribution

from lrlab.cli import main
from lrlab.config import load_config
from lrlab.tune import slots
from lrlab.tune.storage import open_storage
from test_cli import write_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SPACE = {"train.max_lr": {}, "train.weight_decay": {"low": 1e-5, "high": 1e-3, "log": True},
         "train.label_smoothing": {"low": 0.0, "high": 0.2}}


def tiny_recipe(path: Path, cache_dir: Path, data: Path, **tune) -> Path:
    """The tiny recipe with a tune section (4 trials, 2 of them stage 1, no pruning)."""
    recipe = write_recipe(path, cache_dir, data={"path": str(data), "train_subset": 200, "test_subset": 50})
    raw = yaml.safe_load(recipe.read_text())
    raw["lr_finder"]["num_iter"] = 20
    raw["train"]["batch_size"] = 25  # 8 steps per epoch
    raw["tune"] = {"trials": 4, "lr_trials": 2, "pruner": "none", "heartbeat_interval": 1, "grace_period": 30,
                   "space": SPACE, **tune}
    path.write_text(yaml.safe_dump(raw))
    return path


def tune_worker(recipe: Path, storage: str, out: Path, *extra: str, study: str = "s") -> subprocess.Popen:
    """One ``lrlab tune`` worker process of ``study``."""
    return subprocess.Popen([sys.executable, "-m", "lrlab.cli", "tune", str(recipe), "--study", study, "--storage",
                             storage, "--out", str(out), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(*procs: subprocess.Popen) -> list[str]:
    """Wait for the workers; each must exit 0; their final lines."""
    lines = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        lines.append(out.strip())
    return lines


def load(storage: str, study: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=study, storage=open_storage(storage, 1, None, 0))


def assert_budget_done(study: optuna.Study, budget: int, lr_trials: int) -> dict[int, optuna.trial.FrozenTrial]:
    """Every slot has exactly one complete trial with its own run folder, trained once with the
    trial's lr; stage 2 ran at stage 1's best lr. Returns slot -> complete trial."""
    trials = study.get_trials()
    index = slots.slot_index(trials)
    done = {}
    for t in trials:
        assert t.state in (TrialState.COMPLETE, TrialState.FAIL), (t.number, t.state)
        if t.state == TrialState.COMPLETE:
            slot = index[slots.origin(t)]
            assert slot not in done, f"slot {slot} trained twice"
            done[slot] = t
    assert sorted(done) == list(range(budget))
    for slot, t in done.items():
        (run,) = Path(t.user_attrs["run_dir"]).parent.glob(f"{study.study_name}-trial{t.number:04d}-*")  # one per trial
        assert str(run) == t.user_attrs["run_dir"]
        summary = json.loads((run / "summary.json").read_text())
        config = load_config(run / "config.yaml")
        assert summary["best_val_acc"] == t.value and summary["epochs"] == config.train.epochs
        assert config.train.max_lr == t.user_attrs["lr"] == summary["lr"] and not config.lr_finder.enabled
        assert t.user_attrs["stage"] == (1 if slot < lr_trials else 2) and "test_acc_at_best" in t.user_attrs
    stage1 = [done[s] for s in range(lr_trials)]
    best_lr = max(stage1, key=lambda t: (t.value, -t.number)).params["train.max_lr"]
    assert all(done[s].user_attrs["lr"] == best_lr for s in range(lr_trials, budget))
    assert all(set(done[s].params) == {"train.weight_decay", "train.label_smoothing"} for s in range(lr_trials, budget))
    return done


def assert_summary_folder(folder: Path, study: optuna.Study) -> None:
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert [int(r["trial"]) for r in rows] == [t.number for t in study.get_trials()]
    tune = json.loads((folder / "tune.json").read_text())
    best = study.trials[tune["best"]["trial"]]
    assert best.state == TrialState.COMPLETE and best.value == tune["best"]["val_acc"] == study.best_value
    config = load_config(folder / "best.yaml")
    assert config.train.max_lr == config.train.lr == best.user_attrs["lr"] and not config.lr_finder.enabled
    for name in ("history.png", "lr.png"):
        assert (folder / name).stat().st_size > 1000


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tune")


def test_two_workers_share_a_journal_file(root, small_tree, cache_dir):
    """Two workers started together on one journal file: the range test seeds stage 1's range
    once in the study, 4 trials are done between them, none twice, none lost."""
    recipe = tiny_recipe(root / "journal.yaml", cache_dir, small_tree)
    storage, out = f"journal:{root / 'study.journal'}", root / "journal-out"
    lines = finish(tune_worker(recipe, storage, out), tune_worker(recipe, storage, out))
    study = load(storage)
    done = assert_budget_done(study, 4, 2)
    assert len({t.user_attrs["worker"] for t in done.values()}) == 2  # both workers trained
    stored = study.user_attrs["lrlab:lr_range"]
    assert stored["range"] == pytest.approx([stored["lr"] * 0.1, stored["lr"] * 3.0])
    assert all(stored["range"][0] <= done[s].params["train.max_lr"] <= stored["range"][1] for s in (0, 1))
    assert_summary_folder(out / "s", study)
    assert all(line.startswith("study s: 4 complete, 0 pruned, 0 failed of 4 trials; best val top-1") for line in lines)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of Debian's postgresql package in a temporary folder, listening on a
    Unix socket there only (as the postgres user when run as root: initdb refuses root)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert found, "PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)"
    bindir, folder = found[-1].parent, Path(tempfile.mkdtemp(prefix="lrlab-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    folder.chmod(0o755)
    data = folder / "data"

    def run(*args):
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    run(bindir / "pg_ctl", "-D", data, "-o", f"-k {folder} -c listen_addresses='' -F", "-w", "-l", folder / "log",
        "start")
    try:
        yield f"postgresql://postgres@/postgres?host={folder}"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_server(root, small_tree, cache_dir, postgres):
    """The same with an RDB storage on a real PostgreSQL server, the lr range given."""
    recipe = tiny_recipe(root / "pg.yaml", cache_dir, small_tree, pruner="median",
                         space={**SPACE, "train.max_lr": {"low": 0.02, "high": 0.5}})
    out = root / "pg-out"
    finish(tune_worker(recipe, postgres, out), tune_worker(recipe, postgres, out))
    study = load(postgres)
    done = assert_budget_done(study, 4, 2)
    assert all(0.02 <= done[s].params["train.max_lr"] <= 0.5 for s in (0, 1))
    assert "lrlab:lr_range" not in study.user_attrs  # no range test with a given range
    assert_summary_folder(out / "s", study)


def _reported(storage: str) -> bool:
    """True once a trial of the study "k" has reported an epoch's validation accuracy."""
    if storage.startswith("journal:") and not Path(storage.removeprefix("journal:")).exists():
        return False
    try:
        return any(t.intermediate_values for t in load(storage, "k").get_trials())
    except KeyError:  # the study is not created yet
        return False


@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_a_killed_worker_trial_is_failed_and_retried(root, small_tree, cache_dir, request, kind):
    """Worker A is SIGKILLed in the middle of trial 0 (after its first epoch); worker B, started
    afterwards, waits out the grace period, fails trial 0, runs its retry and the rest (the
    journal file: lrlab's heartbeat on Optuna's interface; PostgreSQL: Optuna's own)."""
    recipe = tiny_recipe(root / f"kill-{kind}.yaml", cache_dir, small_tree, trials=3, grace_period=5,
                         space={**SPACE, "train.max_lr": {"low": 0.02, "high": 0.5}})
    storage = f"journal:{root / 'kill.journal'}" if kind == "journal" else request.getfixturevalue("postgres")
    out = root / f"kill-{kind}-out"
    a = tune_worker(recipe, storage, out, "train.epochs=40", study="k")  # A's trials are long: it dies mid-trial
    deadline = time.monotonic() + 300
    while not _reported(storage):
        assert a.poll() is None and time.monotonic() < deadline, a.communicate()
        time.sleep(0.2)
    os.kill(a.pid, signal.SIGKILL)
    a.communicate()
    (killed,) = load(storage, "k").get_trials()
    assert killed.state == TrialState.RUNNING and killed.number == 0
    finish(tune_worker(recipe, storage, out, study="k"))
    study = load(storage, "k")
    done = assert_budget_done(study, 3, 2)
    retry = done[0]
    assert study.trials[0].state == TrialState.FAIL and retry.system_attrs["failed_trial"] == 0
    assert retry.params == killed.params and retry.number > 0  # the same point, trained again
    assert Path(killed.user_attrs["run_dir"], "checkpoints", "last.pt").is_file()  # the dead trial's folder is kept
    rows = list(csv.DictReader((out / "k" / "trials.csv").open()))
    assert [(r["state"], r["retry_of"]) for r in rows if r["trial"] in ("0", str(retry.number))] == [
        ("fail", ""), ("complete", "0")]
    assert rows[0]["note"].endswith(f"retried as trial {retry.number}") and rows[0]["run_dir"] != retry.user_attrs["run_dir"]


def test_sigterm_stops_a_worker_and_queues_its_trial_again(root, small_tree, cache_dir):
    """SIGTERM in the middle of a trial: the epoch's checkpoint, exit 143 with one line, and the
    trial FAIL with a queued retry (the same point) for the next worker; no 'lrlab resume' hint."""
    recipe = tiny_recipe(root / "term.yaml", cache_dir, small_tree, trials=3,
                         space={**SPACE, "train.max_lr": {"low": 0.02, "high": 0.5}})
    storage = f"journal:{root / 'term.journal'}"
    a = tune_worker(recipe, storage, root / "term-out", "train.epochs=40", study="k")
    deadline = time.monotonic() + 300
    while not _reported(storage):
        assert a.poll() is None and time.monotonic() < deadline, a.communicate()
        time.sleep(0.2)
    a.send_signal(signal.SIGTERM)
    _, err = a.communicate(timeout=120)
    assert a.returncode == 143 and err.startswith("error: interrupted by SIGTERM") and "resume" not in err, err
    assert err.strip().count("\n") == 0, err  # one line
    stopped, queued = load(storage, "k").get_trials()
    assert stopped.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert queued.system_attrs["failed_trial"] == 0 and queued.params == stopped.params


def test_median_pruning_stops_a_trial_after_its_epoch(root, small_tree, cache_dir, tmp_path, capsys):
    """Five earlier trials (from other workers) reached 100% validation accuracy at epoch 1, so
    Optuna's median pruner stops the new trial after its first epoch: its state is pruned, its run
    folder keeps the epoch-1 checkpoint, the table shows the epoch it reached."""
    recipe = tiny_recipe(root / "prune.yaml", cache_dir, small_tree, trials=6, lr_trials=6, pruner="median",
                         space={**SPACE, "train.max_lr": {"low": 0.02, "high": 0.5}})
    storage, out = f"journal:{tmp_path / 'prune.journal'}", tmp_path / "out"
    study = optuna.create_study(study_name="s", storage=open_storage(storage, 1, None, 0), direction="maximize")
    for lr in (0.05, 0.1, 0.15, 0.2, 0.25):
        study.add_trial(create_trial(value=1.0, params={"train.max_lr": lr}, user_attrs={"lr": lr},
                                     distributions={"train.max_lr": FloatDistribution(0.02, 0.5, log=True)},
                                     intermediate_values={1: 1.0, 2: 1.0}))
    assert main(["tune", str(recipe), "--study", "s", "--storage", storage, "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("study s: 5 complete, 1 pruned, 0 failed of 6 trials; best val top-1 100.00%")
    pruned = load(storage).trials[5]
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [1]
    assert pruned.intermediate_values[1] < 1.0
    run = Path(pruned.user_attrs["run_dir"])
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "summary.json").exists()
    row = list(csv.DictReader((out / "s" / "trials.csv").open()))[5]
    assert (row["state"], row["last_epoch_reported"], row["val_acc"]) == ("pruned", "1", "")
    args = ["tune", str(recipe), "--study", "s", "--storage", storage, "--out", str(out), "tune.lr_trials=5"]
    assert main(args) == 2  # a worker with another stage 1 cannot join
    assert "error: study 's' was started with tune.lr_trials 6 (this recipe: 5)" in capsys.readouterr().err


def _trial(number: int, state: TrialState, retry_of: int | None = None) -> optuna.trial.FrozenTrial:
    t = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None, params={"x": 0.5},
                     distributions={"x": FloatDistribution(0, 1)},
                     system_attrs={} if retry_of is None else {"failed_trial": retry_of})
    t.number = number
    return t


def test_slots_and_what_a_worker_does_next():
    C, F, R, W = TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING
    budget = slots.Budget(trials=4, lr_trials=2)
    assert slots.next_step([], budget) == slots.RUN
    assert slots.next_step([_trial(0, R)], budget) == slots.RUN  # stage 1 has a free slot
    assert slots.next_step([_trial(0, C), _trial(1, R)], budget) == slots.WAIT  # stage 2 waits for stage 1
    assert slots.next_step([_trial(0, C), _trial(1, C)], budget) == slots.RUN
    trials = [_trial(0, F), _trial(1, C), _trial(2, W, retry_of=0)]
    assert slots.slot_index(trials) == {0: 0, 1: 1} and slots.slot_of(trials, trials[2]) == 0
    assert slots.next_step(trials, budget) == slots.RUN and slots.pending_slots(trials) == {0}
    trials[2] = _trial(2, C, retry_of=0)
    trials += [_trial(3, C), _trial(4, R)]
    assert slots.stage1_done(trials, budget) and slots.next_step(trials, budget) == slots.WAIT
    trials[-1] = _trial(4, C)
    assert slots.next_step(trials, budget) == slots.STOP
    assert [budget.stage(s) for s in range(5)] == [1, 1, 2, 2, None]  # slot 4: opened beyond the budget


@pytest.mark.parametrize("args, message", [
    (["--storage", "journal:/no/such/folder/j.log"],
     "--storage 'journal:/no/such/folder/j.log' cannot be opened (folder /no/such/folder does not exist); "
     "valid forms: sqlite:///PATH (one machine only), postgresql://"),
    (["--storage", "redis://localhost/0"], "--storage 'redis://localhost/0' is not a storage URL; valid forms: sqlite"),
    (["--storage", "sqlite:////no/such/folder/study.db"],
     "--storage 'sqlite:////no/such/folder/study.db' cannot be opened (unable to open database file); valid forms"),
    (["tune.space={train.max_lr: {}, train.weight_decy: {low: 0, high: 1}}"],
     "tune.space key 'train.weight_decy' does not exist; valid keys in train: epochs, batch_size, optimizer"),
    (["tune.space={train.max_lr: {}, train.weight_decay: {low: 0.1, high: 0.01}}"],
     "tune.space.train.weight_decay: empty range: low (0.1) must be below high (0.01)"),
    (["tune.space={train.max_lr: {low: 1, high: 1}}"], "tune.space.train.max_lr: empty range: low (1) must be below"),
    (["tune.space={train.weight_decay: {low: 0, high: 0.1}}"], "tune.space needs exactly one lr axis"),
    (["tune.space={train.max_lr: {}, train.schedule: [onecycle, sometimes]}"],
     "tune.space.train.schedule value 'sometimes': "),
    (["train.optimizer=prodigy", "tune.space={train.max_lr: {}, train.weight_decay: {low: 0, high: 0.1}}"],
     "tune.space.train.max_lr needs low and high with the LR-free train.optimizer prodigy"),
    (["data.val_split=test"], "lrlab tune ranks trials by the validation split, and data.val_split=test would"),
])
def test_bad_input_is_one_line_before_any_work(root, small_tree, cache_dir, tmp_path, capsys, args, message):
    recipe = tiny_recipe(root / "bad.yaml", cache_dir, small_tree)
    out = tmp_path / "out"
    assert main(["tune", str(recipe), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not out.exists()
