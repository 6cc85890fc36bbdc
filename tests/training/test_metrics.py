import json

from pldr.training.metrics import MetricsLog, TrainMetrics, read_metrics


def test_running_global_and_epoch_means():
    m = TrainMetrics()
    m.add({"loss": 4.0, "accuracy": 0.1, "dag_A": None}, epoch=0, tokens=10)
    m.add({"loss": 2.0, "accuracy": 0.3}, epoch=0, tokens=10)
    first = m.report()
    assert first["loss"] == 3.0 and first["accuracy"] == 0.2 and first["dag_A"] is None
    m.add({"loss": 1.0, "accuracy": 0.5}, epoch=1, tokens=10)
    second = m.report()
    assert second["loss"] == 1.0                      # running: since the last report
    assert second["global_loss"] == 7.0 / 3           # global: since the start
    assert second["epoch_loss"] == 1.0                # epoch 1 started fresh
    assert m.tokens == 30


def test_state_round_trip_continues_the_same_means():
    a = TrainMetrics()
    a.add({"loss": 4.0}, 0, 5)
    b = TrainMetrics()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # plain JSON, as in checkpoints
    for m in (a, b):
        m.add({"loss": 2.0}, 0, 5)
    assert a.report() == b.report() and a.tokens == b.tokens


def test_log_drops_records_after_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=None)
    for step in (1, 2, 3):
        log.write({"step": step, "split": "train", "loss": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "tr')  # a line cut short by kill -9
    MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2]
