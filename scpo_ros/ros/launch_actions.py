"""Helpers for the launch files (``launch/*.launch.py``), kept in the package so both files
share one copy. ``launch`` is imported when a helper is called: the package itself runs
without it (``scpo-ros demo`` starts the same graph without ROS tooling)."""
from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-9;]*m")
MATCHED = re.compile(r"publisher matched: (\S+)")


def graph_arguments(record: str, bag: str) -> list:
    """The launch arguments every graph launch file declares: ``malicious``, ``record`` (what
    ``record`` describes), ``bag`` (default ``bag``) and ``plant`` (a shipped NAME, a file or a
    ``package://`` URL; ``graph.plant_file_of`` turns it into ``plant_file``)."""
    from launch.actions import DeclareLaunchArgument

    return [
        DeclareLaunchArgument("malicious", default_value="true", description="malicious expert phases on/off"),
        DeclareLaunchArgument("record", default_value="false", description=record),
        DeclareLaunchArgument("bag", default_value=bag, description="bag directory (must not exist)"),
        DeclareLaunchArgument("plant", default_value="double_integrator",
                              description="shipped plant NAME, plant file path or package:// URL"),
    ]


def start_after_recorder(recorder, topics, actions, what: str) -> list:
    """Event handlers that start ``actions`` once ``recorder`` (a ``bag_recorder`` launch
    action) has logged ``publisher matched: TOPIC`` for every one of ``topics`` (what
    ``scpo-ros demo`` waits for), and shut the launch down if the recorder exits before that
    (its bag directory exists, say) instead of running without the bag."""
    from launch.actions import EmitEvent, LogInfo, RegisterEventHandler
    from launch.event_handlers import OnProcessExit, OnProcessIO
    from launch.events import Shutdown

    waiting, partial, started = set(topics), {True: "", False: ""}, []

    def on_output(event):
        if started:
            return None
        text = partial[event.from_stdout] + ANSI.sub("", event.text.decode(errors="replace"))
        *lines, partial[event.from_stdout] = text.split("\n")   # keep a line cut between two reads
        for line in lines:
            match = MATCHED.search(line)
            if match:
                waiting.discard(match.group(1))
        if waiting:
            return None
        started.append(True)
        return [LogInfo(msg=f"bag_recorder matched {', '.join(sorted(topics))}: starting {what}"), *actions]

    def on_exit(event, _context):
        if started:
            return None
        return [EmitEvent(event=Shutdown(reason=f"bag_recorder exited with {event.returncode} before {what} "
                                                f"started (see its output)"))]

    return [RegisterEventHandler(OnProcessIO(target_action=recorder, on_stdout=on_output, on_stderr=on_output)),
            RegisterEventHandler(OnProcessExit(target_action=recorder, on_exit=on_exit))]
