"""scpo_ros.scpo_worker (ROS-free): the SCPO process and its protocol, as the safety node
drives it (rebuild -> re-certification, proposal -> decision, stop; a crashed process is
restarted), the proposal gate in front of it, the account of its results and their records."""
import json
import math
import os
import signal
import time

import numpy as np

from scpo_ros import graph as g
from scpo_ros.params import MODEL_PARAMS, defaults
from scpo_ros.policy import MLPLayout
from scpo_ros.residual_scpo import backup_weights
from scpo_ros.safety_model import build_model
from scpo_ros.scpo import STATUSES, Decision
from scpo_ros.scpo_worker import ProposalGate, SCPOWorker, WorkerResults, decision_record

# small SCPO settings: short worker steps on a loaded machine
SMALL = {"n_samples": 16, "n_sample_states": 64, "n_cert_states": 128, "horizon_s": 3.0, "hidden": [8]}


def small_model(**changes):
    model = build_model(defaults(MODEL_PARAMS, **{**SMALL, **changes}))
    assert model.safety.horizon_s == SMALL["horizon_s"] and model.safety.steps(model.plant.dt) == 60   # 3 s at 0.05
    return model


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def results(worker, n, timeout=120.0):
    """Poll as the node's results timer does until ``n`` results came back."""
    got = []
    wait_for(lambda: got.extend(worker.poll()) or len(got) >= n, timeout, f"{n} worker results")
    return got


def test_scpo_worker_runs_below_the_control_path_priority():
    worker = SCPOWorker(niceness=7)
    worker.start()
    try:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        pid = worker._proc.pid
        # the worker lowers its priority as its first action; wait for it, not a fixed time
        wait_for(lambda: os.getpriority(os.PRIO_PROCESS, pid) == min(19, own + 7), 60.0, "the worker's niceness")
    finally:
        worker.stop()
    assert not worker.alive()


def test_rebuild_proposal_stop_round_trip():
    model = small_model()
    worker = SCPOWorker()
    worker.start()
    try:
        assert worker.alive()
        worker.rebuild(model, 1, None)
        [(kind, decision, theta, model_id)] = results(worker, 1)
        # no weights given: the backup's own are certified
        assert (kind, decision.status, model_id) == ("recertify", "accepted", 1)
        base = backup_weights(model.layout, model.seed).astype(np.float64)
        assert np.allclose(theta, base)
        # two proposals before the next poll: the newer supersedes the older
        rng = np.random.default_rng(0)
        worker.submit(base + 0.01 * rng.standard_normal(base.size))
        worker.submit(base + 0.01 * rng.standard_normal(base.size))
        assert worker.superseded == 1
        [(kind, decision, theta, model_id)] = results(worker, 1)
        assert kind == "proposal" and model_id == 1 and decision.status in STATUSES
        assert (theta is not None) == decision.committed
        if theta is not None:
            assert np.linalg.norm(theta - base) <= model.config.sample_radius + 1e-5
        # a re-build with the current weights for a new model (a runtime tightening) re-certifies them under it
        tight = small_model(x_min_tight=[-0.98, -math.inf], x_max_tight=[0.98, math.inf])
        assert tight.plant.x_max.tolist() == [0.98, 1.0] and tight.plant.x_min.tolist() == [-0.98, -1.0]
        worker.rebuild(tight, 2, base)
        [(kind, decision, theta, model_id)] = results(worker, 1)
        assert kind == "recertify" and model_id == 2 and decision.status in ("accepted", "rejected")
        # a malformed proposal is reported as a decision, the process keeps serving
        worker.submit(base[:-1])
        [(kind, decision, theta, _)] = results(worker, 1)
        assert kind == "proposal" and decision.status == "rejected" and theta is None
        assert worker.alive()
    finally:
        worker.stop()
    assert not worker.alive()
    worker.stop()           # idempotent


def test_a_request_that_fails_is_an_error_result():
    worker = SCPOWorker()
    worker.start()
    try:
        worker.submit(np.zeros(10))            # a proposal before any model: nothing to step
        [(kind, decision, theta, model_id)] = results(worker, 1)
        assert kind == "error" and decision.status == "rejected" and theta is None and decision.reason
        assert worker.alive()
    finally:
        worker.stop()


def test_a_crashed_worker_is_restarted_and_rebuilt():
    model = small_model()
    worker = SCPOWorker()
    worker.start()
    try:
        worker.rebuild(model, 1, None)
        results(worker, 1)
        os.kill(worker._proc.pid, signal.SIGKILL)
        wait_for(lambda: not worker.alive(), 10.0, "the worker to die")
        assert worker.poll() == []             # nothing blocks on a dead worker
        worker.restart(model, 1, backup_weights(model.layout, model.seed))   # what the node does then
        assert worker.restarts == 1 and worker.alive()
        [(kind, decision, _, model_id)] = results(worker, 1)
        assert (kind, decision.status, model_id) == ("recertify", "accepted", 1)
    finally:
        worker.stop()


# ----------------------------------------------------------------- the gate, the account, the record

def test_proposal_gate_checks_and_aggregates_one_record_per_period():
    layout = MLPLayout(3, 1, (4,))
    gate = ProposalGate(period_s=1.0)
    good = np.zeros(layout.size)
    assert np.array_equal(gate.check(layout, good, layout.fingerprint, True), good)
    assert gate.check(layout, good, None, False) is not None          # no fingerprint, none required
    assert gate.pending == 0 and gate.due(0.0) is None                 # nothing refused: no record
    assert gate.check(layout, good, None, True) is None
    assert gate.reason == "proposal carries no layout fingerprint (layout.dim[0].label)"
    bad = good.copy()
    bad[0] = math.nan
    assert gate.check(layout, bad, layout.fingerprint, True) is None
    reason = gate.reason
    assert reason and "fingerprint" not in reason
    gate.refused_by_size(3, layout.size)
    assert gate.pending == 5 and gate.reason == reason                 # a reason already there stays
    assert gate.due(10.0) == (5, f"malformed proposal: {reason}")
    assert (gate.total, gate.pending, gate.reason) == (5, 0, "")
    gate.refused_by_size(0, layout.size)
    assert gate.reason == ""                                           # nothing refused: no reason
    gate.refused_by_size(2, layout.size)
    assert gate.reason == f"wrong message size: expected {layout.size} weights and a layout label"
    assert gate.due(10.9) is None and gate.pending == 2                # within the period: kept for the next
    assert gate.due(11.0) == (2, f"malformed proposal: wrong message size: expected {layout.size} weights and "
                                 f"a layout label")
    assert gate.total == 7 and gate.due(20.0) is None


def test_worker_results_account_what_to_deploy_and_the_level():
    res = WorkerResults()
    accepted, rejected = Decision(status="accepted"), Decision(status="rejected", reason="no")
    theta = np.zeros(3)
    assert res.account("recertify", accepted, theta, True, True) == (True, g.LEVEL_OK)
    assert res.account("recertify", rejected, theta, True, True) == (True, g.LEVEL_WARN)
    assert res.account("recertify", accepted, theta, False, True) is None     # an older model's: skipped
    assert res.recertifications == {"accepted": 2, "rejected": 1}
    assert res.account("proposal", accepted, theta, True, False) == (True, g.LEVEL_OK)
    assert res.account("proposal", accepted, theta, True, True) == (False, g.LEVEL_OK)    # re-certifying
    assert res.account("proposal", accepted, theta, False, False) == (False, g.LEVEL_OK)  # another model's
    assert res.account("proposal", rejected, None, True, False) == (False, g.LEVEL_OK)
    assert res.updates == {**{k: 0 for k in STATUSES}, "accepted": 3, "rejected": 1}
    assert res.account("error", Decision(status="rejected", reason="boom"), None, True, False) == \
        (False, g.LEVEL_ERROR)
    assert res.errors == 1 and res.updates["rejected"] == 1


def test_decision_record_json():
    decision = Decision(status="accepted", step=np.int64(3), times_ms={"total": np.float32(1.5)})
    record = decision_record("proposal", decision, stamp=12.5, weights_version=2)
    data = json.loads(record)
    assert list(data)[:3] == ["kind", "stamp", "weights_version"]
    assert data["kind"] == "proposal" and data["stamp"] == 12.5 and data["weights_version"] == 2
    assert data["status"] == "accepted" and data["step"] == 3 and data["times_ms"] == {"total": 1.5}
    assert {k: v for k, v in data.items() if k not in ("kind", "stamp", "weights_version")} == \
        {**Decision(status="accepted").to_dict(), "step": 3, "times_ms": {"total": 1.5}}
    data = json.loads(decision_record("malformed", Decision(status="rejected", reason="r"), count=4, stamp=1.0))
    assert list(data)[:3] == ["kind", "count", "stamp"] and data["count"] == 4 and data["reason"] == "r"
