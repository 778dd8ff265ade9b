"""The SCPO worker process of ``scpo_safety_node``, ROS-free: the parent's side
(``SCPOWorker``, polled from an executor timer, never blocking) and the process itself
(``_worker_main``: one ``ResidualSCPO`` per model, one request at a time); the gate in front
of it (``ProposalGate``: malformed proposals refused and reported in aggregate), what the
node does with a result and its counts (``WorkerResults``) and the ``scpo_decision`` record
of it (``decision_record``).

Protocol over one pipe. Requests: ``("rebuild", model, model_id, theta)`` (build the SCPO
client for ``model``, re-certify ``theta`` or fall back to the backup's weights),
``("proposal", flat)``, ``("stop",)``. Results: ``(kind, decision, theta or None,
model_id)`` with ``kind`` one of ``recertify``, ``proposal``, ``error``.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from .graph import LEVEL_ERROR, LEVEL_OK, LEVEL_WARN
from .policy import MLPLayout, WeightsRejected, check_weights
from .residual_scpo import ResidualSCPO
from .safety_model import Model
from .scpo import STATUSES, Decision


def _worker_main(conn, niceness: int = 0) -> None:
    """The SCPO process: one request at a time from ``conn``, one result back per request.

    ``niceness`` lowers its CPU priority (``os.nice``) so that, on a loaded CPU, the
    scheduler runs the control callback first (measured: p99 round trip 2.4–2.9 ms with
    an equal-priority worker on 2 cores). The protocol: the module docstring.
    """
    import signal as _signal
    if niceness > 0:
        try:
            os.nice(niceness)
        except OSError:                                # not permitted here: run at the parent's priority
            pass

    import torch
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)   # the parent decides when to stop
    torch.set_num_threads(1)
    scpo, model_id = None, -1
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):                    # parent gone
            return
        try:
            if req[0] == "stop":
                return
            if req[0] == "rebuild":
                _, model, model_id, theta = req
                scpo = ResidualSCPO(model.plant, model.backup, model.layout, model.config, safety=model.safety,
                                    n_sample_states=model.n_sample_states, n_cert_states=model.n_cert_states,
                                    seed=model.seed, safe_set=model.certificate_set())
                if theta is not None and np.shape(theta) == scpo.theta.shape:
                    scpo.theta = np.asarray(theta, dtype=np.float32).copy()
                decision = scpo.recertify()
                conn.send(("recertify", decision, scpo.theta.astype(np.float64), model_id))
            elif req[0] == "proposal":
                decision = scpo.propose_weights(req[1])
                theta = scpo.theta.astype(np.float64) if decision.committed else None
                conn.send(("proposal", decision, theta, model_id))
        except Exception as exc:  # report, keep serving; the parent keeps its certified weights
            conn.send(("error", Decision(status="rejected", reason=f"{type(exc).__name__}: {exc}"), None, model_id))


class SCPOWorker:
    """Parent side of the SCPO process: a one-slot mailbox per request kind.

    SCPO steps run in their own process, not a thread: a thread would hold the GIL
    between the hundreds of small torch calls of a rollout and stall the control
    callback (measured: median callback compute 35 µs alone, ~170 µs beside a busy
    worker thread). ``poll()`` (from an executor timer) collects results and sends the
    next request; a re-build outranks proposals and the newest proposal supersedes older
    ones. Nothing here blocks.
    """

    def __init__(self, min_period_s: float = 0.0, niceness: int = 0):
        import multiprocessing as mp
        self._ctx = mp.get_context("spawn")   # never fork a process that runs DDS threads
        self.min_period_s = min_period_s
        self.niceness = niceness
        self.superseded = 0
        self.restarts = 0
        self._proc = None
        self._conn = None
        self._busy = False
        self._pending_rebuild = None
        self._pending_proposal = None
        self._last_sent = 0.0
        self._stopping = False

    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker_main, args=(child, self.niceness), name="scpo_worker",
                                       daemon=True)
        self._proc.start()
        child.close()
        self._conn, self._busy = parent, False

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def rebuild(self, model: Model, model_id: int, theta) -> None:
        self._pending_rebuild = (model, model_id, None if theta is None else np.asarray(theta))

    def submit(self, flat: np.ndarray) -> None:
        if self._pending_proposal is not None:
            self.superseded += 1
        self._pending_proposal = flat

    def poll(self) -> list:
        results = []
        try:
            while self._conn is not None and self._conn.poll():
                results.append(self._conn.recv())
                self._busy = False
        except (EOFError, OSError):
            self._busy = False
        if self._busy or not self.alive():
            return results
        if self._pending_rebuild is not None:
            self._conn.send(("rebuild", *self._pending_rebuild))
            self._pending_rebuild, self._busy = None, True
        elif self._pending_proposal is not None and time.monotonic() - self._last_sent >= self.min_period_s:
            self._conn.send(("proposal", self._pending_proposal))
            self._pending_proposal, self._busy = None, True
            self._last_sent = time.monotonic()
        return results

    def restart(self, model: Model, model_id: int, theta) -> None:
        """A new process for a dead one, rebuilt for ``model`` with the weights in force."""
        self.restarts += 1
        self.stop()
        self.start()
        self.rebuild(model, model_id, theta)

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=5.0)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=2.0)
        self._conn.close()
        self._proc, self._conn = None, None


class ProposalGate:
    """What reaches the worker: a proposal checked (``policy.check_weights``, and a layout
    fingerprint where one is required); a malformed one is refused and counted, and the
    refusals are reported in one aggregated record per ``period_s`` (a flood must not flood
    the decision topic).

    Here, beside the worker, rather than in ``policy``: ``check_weights`` says whether one
    vector fits a layout; counting, aggregating and pacing the refusals is the SCPO path's
    protocol, as is the worker's. ``pending``: refused since the last record; ``total``:
    refused in records already made (``total + pending`` in all).
    """

    def __init__(self, period_s: float = 1.0):
        self.period_s = period_s
        self.total = 0
        self.pending = 0
        self.reason = ""
        self._last_record = -math.inf

    def refused_by_size(self, n: int, size: int) -> None:
        """``n`` messages refused before deserialisation (``ProposalIntake.drain_rejections``)."""
        self.pending += n
        if self.pending and not self.reason:
            self.reason = f"wrong message size: expected {size} weights and a layout label"

    def check(self, layout: MLPLayout, flat, fingerprint: str | None, require_fingerprint: bool) -> np.ndarray | None:
        """The checked weights, or None for a malformed proposal (counted, its reason kept)."""
        try:
            if fingerprint is None and require_fingerprint:
                raise WeightsRejected("proposal carries no layout fingerprint (layout.dim[0].label)")
            return check_weights(layout, flat, fingerprint)
        except WeightsRejected as exc:
            self.pending += 1
            self.reason = str(exc)
            return None

    def due(self, now: float) -> tuple[int, str] | None:
        """``(count, reason)`` of the refusals pending when a record is due at ``now`` (then
        they count in ``total``), else None."""
        if not self.pending or now - self._last_record < self.period_s:
            return None
        n, reason = self.pending, f"malformed proposal: {self.reason}"
        self.total += n
        self.pending, self.reason, self._last_record = 0, "", now
        return n, reason


class WorkerResults:
    """The parent's account of the worker's results: ``updates`` per status (proposals, and the
    malformed ones refused before the worker), ``recertifications`` (accepted, rejected),
    ``errors`` (failed requests, dead workers)."""

    def __init__(self):
        self.updates = {k: 0 for k in STATUSES}
        self.recertifications = {"accepted": 0, "rejected": 0}
        self.errors = 0

    def account(self, kind: str, decision: Decision, theta, current: bool,
                certifying: bool) -> tuple[bool, int] | None:
        """Count one result; ``(deploy theta, diagnostic level)``, or None for a re-certification
        of a model that another change has replaced meanwhile (wait for that one's result).
        ``current``: the result is for the model in force; ``certifying``: the law in force
        waits for a re-certification (no proposal is deployed meanwhile)."""
        if kind == "recertify":
            accepted = decision.status == "accepted"
            self.recertifications["accepted" if accepted else "rejected"] += 1
            return (True, LEVEL_OK if accepted else LEVEL_WARN) if current else None
        if kind == "proposal":
            self.updates[decision.status] += 1
            return theta is not None and not certifying and current, LEVEL_OK
        self.errors += 1
        return False, LEVEL_ERROR


def decision_record(kind: str, decision: Decision, **fields) -> str:
    """The ``scpo_decision`` JSON of ``decision``: ``kind`` (``recertify``, ``proposal``,
    ``error``, ``malformed``), then ``fields`` (stamp, counts, versions), then the decision."""
    return json.dumps({"kind": kind, **fields, **decision.to_dict()}, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
