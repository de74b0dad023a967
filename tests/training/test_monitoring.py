"""Run monitoring: the progress bar in log files, TensorBoard scalars, the per-step history."""

import io
import json

from plot_ds.training.monitoring import RunMonitor, StepLog


def test_progress_bar_in_a_log_file_is_ascii(tmp_path, monkeypatch):
    log = io.StringIO()  # not a tty, like a Slurm log
    monkeypatch.setattr("sys.stderr", log)
    monitor = RunMonitor(tmp_path / "tb", total_steps=3, enabled=True, tensorboard=False)
    for step in range(1, 4):
        monitor.log(step, {"loss/total": 0.69 - step / 100, "lr": 1e-6})
        monitor.advance()
    monitor.close()
    text = log.getvalue()
    assert "3/3" in text and "loss=0.66" in text
    assert text.isascii(), [ch for ch in text if not ch.isascii()]


def test_metrics_reach_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr("sys.stderr", io.StringIO())
    monitor = RunMonitor(tmp_path / "tb", total_steps=2, enabled=True, tensorboard=True)
    monitor.log(1, {"loss/total": 0.5, "plot/ot_distance": 0.25})
    monitor.log(2, {"loss/total": 0.4, "plot/ot_distance": 0.20})
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    losses = [(e.step, round(e.value, 6)) for e in events.Scalars("loss/total")]
    assert losses == [(1, 0.5), (2, 0.4)]
    assert [e.step for e in events.Scalars("plot/ot_distance")] == [1, 2]


def test_disabled_monitor_writes_nothing(tmp_path, monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    monitor = RunMonitor(tmp_path / "tb", total_steps=2, enabled=False, tensorboard=True)
    monitor.log(1, {"loss/total": 0.5})
    monitor.advance()
    monitor.message("hello")
    monitor.close()
    assert log.getvalue() == "" and not (tmp_path / "tb").exists()


def test_step_log_keeps_one_history_across_a_resume(tmp_path):
    path = tmp_path / "train_history.jsonl"
    first = StepLog(path, resume_step=0)
    for step in (1, 2, 3):
        first.write({"step": step, "loss": step})
    first.close()
    # The run died after step 3 but its last checkpoint was step 2: step 3 is redone.
    resumed = StepLog(path, resume_step=2)
    resumed.write({"step": 3, "loss": 30})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in resumed.records()] == [(1, 1), (2, 2), (3, 30)]
    assert all(json.loads(line) for line in path.read_text().splitlines())
