"""Input validation for the control path, ROS-free (numpy and the standard library only).

Three small objects the nodes put between a subscription callback and the controller, and
two that watch the stream (``InputMonitor``: the ``inputs`` diagnostic; ``StampPeriod``):

- ``JointMap``: ``sensor_msgs/JointState``-like data (names, position, velocity, effort)
  -> the state vector ``x`` by joint *name*. Joint order in the message does not matter,
  extra joints are ignored (a ros2_control ``joint_state_broadcaster`` publishes every
  joint of the robot), a missing joint rejects the message.
- ``StateGate``: accepts or rejects a state by its header stamp (ordering, age, future),
  and resets its history on a clock jump instead of rejecting every state from then on.
- ``ReferenceGate``: the one reference rule of both nodes (clamp into the certified
  reference box; a malformed reference keeps the last valid one).

Every check returns ``None`` (accept) or a short reason string that the node counts and
puts into its diagnostics (``reject_text`` says what it means); nothing here logs or raises
on bad input.

Clock assumptions (``StateGate``)
---------------------------------
- A state's stamp and ``now`` are read on the *same* time base: the receiving node's ROS
  clock. On one machine the system clock is shared; across machines the clocks must be
  synchronised (chrony/PTP) to well within ``max_age`` and ``future_tolerance``.
- ``max_age = 0`` disables the age check, for publishers whose clock is not synchronised
  with the receiver's (their stamps must still increase; the future check still applies
  while ``now`` is valid). ``future_tolerance`` must then cover the clock offset too.
- ``use_sim_time``: the publisher (simulator, ``ros2 bag play --clock``) stamps with the
  time it publishes on ``/clock`` and the receiver reads ``/clock``. Until the first
  ``/clock`` message arrives the receiver's clock is not valid: pass ``now=None`` and only
  the ordering check applies.
- A stamp is not authentication: these checks reject stale, reordered, replayed and
  duplicated messages (a zombie publisher, a bag played onto a live topic, a wrong clock),
  not a publisher that stamps lies with the current time.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .graph import LEVEL_OK, LEVEL_WARN

JOINT_FIELDS = ("position", "velocity", "effort")
"""The ``JointState`` arrays a state entry can be read from."""

_FIELD_INDEX = {f: i for i, f in enumerate(JOINT_FIELDS)}

# reasons (the strings the nodes count and publish)
MISSING_JOINT = "missing_joint"
BAD_LENGTHS = "bad_lengths"
NON_FINITE = "non_finite"
NON_INCREASING_STAMP = "non_increasing_stamp"
STALE_STAMP = "stale_stamp"
FUTURE_STAMP = "future_stamp"
BAD_STAMP = "bad_stamp"
BAD_SIZE = "bad_size"
CLAMPED = "clamped"


def reject_text(reason: str, joints: Sequence[str], max_age: float, future_tolerance: float) -> str:
    """What a rejection ``reason`` of ``JointMap.read`` or ``StateGate.check`` means, for a log
    line or a diagnostic: ``joints`` the needed joints, ``max_age`` and ``future_tolerance``
    the gate's settings (an unknown reason is its own text)."""
    return {MISSING_JOINT: f"needs joints {tuple(joints)}",
            BAD_LENGTHS: "a needed field (position, velocity, effort) does not match the names, "
                         "or a joint is named twice",
            NON_FINITE: "NaN or Inf", NON_INCREASING_STAMP: "stamp not newer than the last accepted one",
            STALE_STAMP: f"stamp older than max_state_age = {max_age:g} s",
            FUTURE_STAMP: f"stamp more than future_tolerance = {future_tolerance:g} s ahead"}.get(reason, reason)


def axis_names(dof: int) -> list[str]:
    """The default joint names ``axis_0..axis_{dof-1}`` (what our simulator publishes)."""
    return [f"axis_{i}" for i in range(dof)]


def reference_text(reason: str, values: Sequence[float], lower: Sequence[float], upper: Sequence[float]) -> str:
    """The log line of a reference that ``ReferenceGate.apply`` clamped or rejected (``reason``);
    ``lower``/``upper`` the certified reference box."""
    what = "clamped into" if reason == CLAMPED else "kept the last valid, in"
    box = ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in zip(lower, upper))
    return f"reference {list(values)[:8]}: {reason} ({what} the certified reference box {box})"


# ------------------------------------------------------------------------- JointMap

class JointMap:
    """Reads the state vector from ``JointState``-like data by joint name.

    ``entries[k] = (joint_name, field)`` says where state entry ``k`` comes from, field in
    ``position | velocity | effort``. This is the general form a plant file's ``joints:``
    map (state name -> {joint, field}) fills: ``JointMap.for_plant(plant)``;
    ``JointMap.for_axes(dof, joint_names)`` builds the common ``x = [p_1..p_dof, v_1..v_dof]``.

    ``read`` rejects a message (returns a reason) when
      - ``missing_joint``: a needed joint is not in ``names``;
      - ``bad_lengths``: a needed joint appears more than once in ``names``, or a needed
        field's array does not have one value per name (``JointState`` says each array
        is empty or as long as ``names``: a longer array is as malformed as a shorter one
        and the pairing of names and values cannot be trusted either way);
      - ``non_finite``: a needed value is NaN or infinite.
    Fields that no entry needs are not looked at (an empty ``effort`` is fine).

    Speed: a publisher sends the same ``names`` every time, so the index lookup of the
    last ``names`` seen is cached; a hit costs one list comparison, one list
    comprehension, a finiteness check over Python floats and one slice assignment into
    ``out``, no numpy call beyond that write.
    """

    def __init__(self, entries: Sequence[tuple[str, str]]):
        entries = [tuple(e) for e in entries]
        if not entries:
            raise ValueError("JointMap needs at least one (joint, field) entry")
        seen: set[tuple[str, str]] = set()
        for k, e in enumerate(entries):
            if len(e) != 2:
                raise ValueError(f"JointMap entry {k}: expected (joint_name, field), got {e!r}")
            joint, field = e
            if not isinstance(joint, str) or not joint:
                raise ValueError(f"JointMap entry {k}: joint name must be a non-empty string, got {joint!r}")
            if field not in _FIELD_INDEX:
                raise ValueError(f"JointMap entry {k} ({joint}): field must be one of "
                                 f"{', '.join(JOINT_FIELDS)}, got {field!r}")
            if e in seen:
                raise ValueError(f"JointMap: {joint}.{field} is mapped to more than one state entry")
            seen.add(e)
        self.entries: tuple[tuple[str, str], ...] = tuple(entries)
        self.size = len(entries)
        # needed joints in first-use order, and the fields that must be well-formed
        self.joints: tuple[str, ...] = tuple(dict.fromkeys(j for j, _ in entries))
        self.fields: tuple[str, ...] = tuple(f for f in JOINT_FIELDS if any(f == g for _, g in entries))
        self._field_ids = tuple(_FIELD_INDEX[f] for f in self.fields)
        # write(): per entry (field id, joint index) into the message's arrays
        self._write_plan = tuple((_FIELD_INDEX[f], self.joints.index(j)) for j, f in entries)
        # cache: the last names list seen and what it resolved to: a plan
        # [(field id, index into that field's array)] per entry, or a reason
        self._names: list[str] | None = None
        self._plan: list[tuple[int, int]] | None = None
        self._reason: str | None = None
        self.lookups = 0   # cache misses (index lookups done); a test and a diagnostic can read it

    @classmethod
    def for_plant(cls, plant) -> JointMap:
        """The state of ``plant`` from its file's ``joints:`` map (state order)."""
        return cls(plant.joints)

    @classmethod
    def for_axes(cls, dof: int, joint_names: Sequence[str] | None = None) -> JointMap:
        """``x = [p_1..p_dof, v_1..v_dof]`` from the joints ``joint_names`` (state order);
        empty or None means ``axis_0..axis_{dof-1}``."""
        if isinstance(dof, bool) or not isinstance(dof, (int, np.integer)) or dof < 1:
            raise ValueError(f"dof must be a positive integer, got {dof!r}")
        names = list(joint_names) if joint_names else axis_names(int(dof))
        if len(names) != dof:
            raise ValueError(f"joint_names has {len(names)} entries {names}, the plant has dof = {dof}: "
                             f"give one joint per axis, in state order (or none for the axis names)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"joint_names lists {', '.join(map(repr, dup))} more than once: {names}")
        return cls([(n, "position") for n in names] + [(n, "velocity") for n in names])

    def __repr__(self) -> str:
        return f"JointMap({list(self.entries)!r})"

    def _resolve(self, names: list[str]) -> None:
        """Index lookup for a new names list; fills the cache."""
        self.lookups += 1
        index: dict[str, int] = {}
        duplicated: set[str] = set()
        for i, n in enumerate(names):
            if n in index:
                duplicated.add(n)
            else:
                index[n] = i
        self._names = names
        self._plan = None
        if any(j not in index for j in self.joints):
            self._reason = MISSING_JOINT
        elif any(j in duplicated for j in self.joints):
            self._reason = BAD_LENGTHS
        else:
            self._reason = None
            self._plan = [(_FIELD_INDEX[f], index[j]) for j, f in self.entries]

    def read(self, names: Sequence[str], position: Sequence[float], velocity: Sequence[float],
             out: np.ndarray, effort: Sequence[float] = ()) -> str | None:
        """Fill ``out`` (float64, ``size`` entries) from the message's arrays; None on
        success, else the reason. ``out`` is left untouched whenever a reason is returned
        (all checks run before the write), so the caller may keep using its old content,
        though the nodes discard the message on any reason anyway."""
        if names != self._names:
            # a non-list sequence (tuple) never equals the cached list: compare as a list
            key = list(names)
            if key != self._names:
                self._resolve(key)
        if self._reason is not None:
            return self._reason
        arrays = (position, velocity, effort)
        n = len(self._names)
        for f in self._field_ids:
            if len(arrays[f]) != n:
                return BAD_LENGTHS
        vals = [arrays[f][i] for f, i in self._plan]
        # isfinite over Python floats (array.array yields them): cheaper than a numpy
        # round trip for a handful of values, and the check comes before the write
        if not all(map(math.isfinite, vals)):
            return NON_FINITE
        out[:] = vals
        return None

    def write(self, x: Sequence[float]) -> tuple[list[str], list[float], list[float], list[float]]:
        """The inverse of ``read``: ``(name, position, velocity, effort)`` of a JointState that
        carries state ``x`` (``size`` entries). Joints in first-use order; a field no entry uses
        stays empty, and a used field's slot of a joint that does not map it is NaN (the
        JointState convention for "not measured")."""
        if len(x) != self.size:
            raise ValueError(f"JointMap.write: {len(x)} values for {self.size} state entries")
        arrays = [[math.nan] * len(self.joints) if f in self.fields else [] for f in JOINT_FIELDS]
        for (field_id, joint), v in zip(self._write_plan, x):
            arrays[field_id][joint] = float(v)
        return list(self.joints), arrays[0], arrays[1], arrays[2]

    def read_msg(self, msg, out: np.ndarray) -> str | None:
        """``read`` from anything with ``name``, ``position``, ``velocity``, ``effort``
        attributes (a ``sensor_msgs/JointState``)."""
        return self.read(msg.name, msg.position, msg.velocity, out, msg.effort)


# ------------------------------------------------------------------------ StateGate

class StateGate:
    """Accepts a state by its stamp, or says why not (all times in seconds).

    ``check(stamp, now)``, in this order:
      1. Receiving clock jump: ``now`` earlier than the ``now`` of the previous call by
         more than ``clock_epsilon`` (a bag loop or a simulator restart under
         ``use_sim_time``, an NTP step back): the stamp history is reset, ``jumps`` is
         incremented and ``last_jump`` holds the (negative) size; the state is then
         checked freshly by the steps below. Forward jumps need no reset (stamps keep
         increasing) and are not reported.
      2. ``future_stamp``: ``stamp - now > future_tolerance``.
      3. ``stale_stamp``: ``now - stamp > max_age`` (only when ``max_age > 0``).
      4. ``non_increasing_stamp``: ``stamp <= `` the last accepted stamp (a duplicate,
         a reordered or a replayed message).
    Steps 1-3 are skipped while ``now`` is None (the receiving clock is not valid yet).

    Stamp-stream restart: with no age check in effect (``max_age = 0`` or ``now`` None),
    a publisher that restarts its own clock, or a single message stamped far in the
    future, would make every later state "non-increasing" forever. So when
    ``restart_confirm`` consecutive rejected stamps are each more than ``jump_threshold``
    behind the last accepted stamp *and* strictly increase among themselves, the gate
    takes them as a new stream: history reset, a jump reported (``last_jump`` = new stamp
    minus the old last stamp), and that last stamp accepted. A single replayed or stray
    message never does this; any accepted state cancels a pending restart. With the age
    check in effect such stamps are stale and step 3 rejects them first.

    A rejected state never changes the stamp history, so a replayed old message cannot
    count as accepted (nor reset a node's stale-state watchdog, which must count only
    accepted states).
    """

    def __init__(self, max_age: float, future_tolerance: float, jump_threshold: float = 1.0,
                 restart_confirm: int = 3, clock_epsilon: float = 1e-6):
        for name, v in (("max_age", max_age), ("future_tolerance", future_tolerance),
                        ("jump_threshold", jump_threshold), ("clock_epsilon", clock_epsilon)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0.0):
                raise ValueError(f"StateGate: {name} must be a finite number >= 0, got {v!r}")
        if isinstance(restart_confirm, bool) or not isinstance(restart_confirm, int) or restart_confirm < 1:
            raise ValueError(f"StateGate: restart_confirm must be an integer >= 1, got {restart_confirm!r}")
        self.max_age = float(max_age)
        self.future_tolerance = float(future_tolerance)
        self.jump_threshold = float(jump_threshold)
        self.restart_confirm = restart_confirm
        self.clock_epsilon = float(clock_epsilon)
        self.accepted = 0
        self.rejected: dict[str, int] = {NON_INCREASING_STAMP: 0, STALE_STAMP: 0, FUTURE_STAMP: 0}
        self.jumps = 0
        self.last_jump: float | None = None          # s, signed (negative: backwards)
        self.last_jump_source: str | None = None     # "receive_clock" | "stamp_stream"
        self.reset()

    @property
    def last_stamp(self) -> float | None:
        """The last accepted stamp (None after a reset)."""
        return self._last_stamp

    def reset(self) -> None:
        """Forget the stamp and clock history (e.g. on activation); counters are kept."""
        self._last_stamp: float | None = None
        self._last_now: float | None = None
        self._restart_last: float | None = None
        self._restart_count = 0

    def _jump(self, size: float, source: str) -> None:
        self._last_stamp = None
        self._restart_last = None
        self._restart_count = 0
        self.jumps += 1
        self.last_jump = size
        self.last_jump_source = source

    def _reject(self, reason: str) -> str:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return reason

    def check(self, stamp: float, now: float | None) -> str | None:
        """None to accept the state stamped ``stamp``, else the reason (counted)."""
        if not math.isfinite(stamp):
            return self._reject(BAD_STAMP)
        if now is not None and not math.isfinite(now):
            now = None
        if now is not None:
            if self._last_now is not None and now < self._last_now - self.clock_epsilon:
                self._jump(now - self._last_now, "receive_clock")
            self._last_now = now
            if stamp - now > self.future_tolerance:
                return self._reject(FUTURE_STAMP)
            if self.max_age > 0.0 and now - stamp > self.max_age:
                return self._reject(STALE_STAMP)
        last = self._last_stamp
        if last is not None and stamp <= last:
            if last - stamp > self.jump_threshold:
                if self._restart_last is not None and stamp > self._restart_last:
                    self._restart_count += 1
                else:
                    self._restart_count = 1
                self._restart_last = stamp
                if self._restart_count >= self.restart_confirm:
                    self._jump(stamp - last, "stamp_stream")
                    return self._accept(stamp)
            else:
                self._restart_last = None
                self._restart_count = 0
            return self._reject(NON_INCREASING_STAMP)
        return self._accept(stamp)

    def _accept(self, stamp: float) -> None:
        self._last_stamp = stamp
        self._restart_last = None
        self._restart_count = 0
        self.accepted += 1
        return None


# -------------------------------------------------------------------- ReferenceGate

class ReferenceGate:
    """The reference rule of both nodes.

    - Wrong size (``bad_size``) or a NaN/Inf entry (``non_finite``): rejected, ``out`` is
      left as it is, so the last valid reference stays in force.
    - Otherwise the reference is clamped element-wise into the certified reference box
      ``[lower, upper]`` and written to ``out``; ``clamped`` is returned (and counted) when
      any entry had to move, None when it was inside already (then ``out`` equals it).
    Clamping rather than keeping the last valid value: a reference just outside the box
    (an operator asking for the wall) still moves the plant as far as is certified, and
    the result never depends on what came before. Counters: ``accepted`` (written to
    ``out``, clamped or not), ``clamped``, ``rejected`` per reason.
    """

    def __init__(self, lower, upper):
        lo = np.array(lower, dtype=np.float64).reshape(-1)
        hi = np.array(upper, dtype=np.float64).reshape(-1)
        if lo.shape != hi.shape:   # empty for a plant without tracked states: only [] is valid
            raise ValueError(f"ReferenceGate: lower and upper need the same number of entries, "
                             f"got {lo.size} and {hi.size}")
        if np.isnan(lo).any() or np.isnan(hi).any() or not (lo <= hi).all():
            raise ValueError(f"ReferenceGate: need lower <= upper (no NaN), got {lo.tolist()} / {hi.tolist()}")
        self.lower, self.upper = lo, hi
        self.dof = lo.size
        self.accepted = 0
        self.clamped = 0
        self.rejected: dict[str, int] = {BAD_SIZE: 0, NON_FINITE: 0}

    def contains(self, r) -> bool:
        r = np.asarray(r, dtype=np.float64)
        return bool(r.shape == self.lower.shape and np.all((self.lower <= r) & (r <= self.upper)))

    def apply(self, r_in: Sequence[float], out: np.ndarray) -> str | None:
        """Validate and clamp ``r_in`` into ``out``; None, ``clamped``, or a rejection."""
        try:
            if len(r_in) != self.dof:
                return self._reject(BAD_SIZE)
            r = np.asarray(r_in, dtype=np.float64)
        except (TypeError, ValueError):   # not a sequence of numbers
            return self._reject(BAD_SIZE)
        if r.shape != self.lower.shape:
            return self._reject(BAD_SIZE)
        if not np.isfinite(r).all():
            return self._reject(NON_FINITE)
        c = np.minimum(np.maximum(r, self.lower), self.upper)
        out[:] = c
        self.accepted += 1
        if np.array_equal(c, r):
            return None
        self.clamped += 1
        return CLAMPED

    def _reject(self, reason: str) -> str:
        self.rejected[reason] += 1
        return reason


# --------------------------------------------------------------------- the stream

class InputMonitor:
    """A controller's account of its inputs, ROS-free: states rejected per reason (``reject``),
    and the ``inputs`` diagnostic (``status``, ``counts``) from them, the reference gate's
    counters and the state gate's clock jumps. The gates are the node's own (kept for its
    lifetime); the monitor only reads them."""

    REPORT_PERIOD_S = 0.5
    """Least time between two diagnostics that only update counts (a new reason goes out at once)."""

    def __init__(self, joints: JointMap, gate: StateGate, references: ReferenceGate):
        self.joints, self.gate, self.references = joints, gate, references
        self.bad_states = 0
        self.rejected: dict[str, int] = {}
        self.last_reason = ""
        self._reported = -math.inf

    def reject(self, reason: str, now: float) -> bool:
        """Count a rejected state (``now``: a steady clock); True when the diagnostic is due."""
        self.bad_states += 1
        first = reason not in self.rejected
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if first or now - self._reported >= self.REPORT_PERIOD_S:
            self.last_reason = reason
            return True
        return False

    def text(self, reason: str) -> str:
        return reject_text(reason, self.joints.joints, self.gate.max_age, self.gate.future_tolerance)

    def counts(self) -> dict:
        return {"rejected_states": dict(self.rejected), "clamped_references": self.references.clamped,
                "bad_references": sum(self.references.rejected.values()), "clock_jumps": self.gate.jumps}

    def status(self, now: float, clock_missing: bool) -> tuple[int, str]:
        """The diagnostic's ``(level, text)`` at ``now``: WARN for rejected states, clamped or
        malformed references, or ``clock_missing`` (use_sim_time without a ``/clock``)."""
        level, text = LEVEL_OK, "inputs valid"
        rejected = sum(self.rejected.values())
        bad_references = sum(self.references.rejected.values())
        if clock_missing:
            level, text = LEVEL_WARN, "use_sim_time is set but no /clock has arrived: stamp ages are not checked"
        elif self.references.clamped or bad_references:
            level, text = LEVEL_WARN, (f"{self.references.clamped} references clamped into the certified "
                                       f"reference box, {bad_references} malformed kept the last valid")
        if rejected:
            last = f"{rejected} joint_states rejected (last: {self.last_reason}: {self.text(self.last_reason)})"
            level, text = LEVEL_WARN, last if level == LEVEL_OK else f"{last}; {text}"
        if self.gate.jumps:
            text += f"; {self.gate.jumps} clock jumps (stamp history reset)"
        self._reported = now
        return level, text


class StampPeriod:
    """The period of a state stream from its stamps: an exponential average (weight 0.05) of
    the increments (``value``, None before the second stamp); a stamp not newer than the last
    changes nothing but becomes the last."""

    def __init__(self):
        self.value: float | None = None
        self._last: float | None = None

    def update(self, stamp: float) -> None:
        if self._last is not None and stamp > self._last:
            gap = stamp - self._last
            self.value = gap if self.value is None else 0.95 * self.value + 0.05 * gap
        self._last = stamp
