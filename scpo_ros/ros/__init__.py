"""rclpy helpers for the scpo_ros nodes, one module per concern.

- ``parameters``: ``ParamSpec`` (``scpo_ros.params``) -> ``ParameterDescriptor``; declare,
  read and validate parameters;
- ``diagnostics``: ``/diagnostics`` publishing (a minimal ``diagnostic_updater``);
- ``messages``: message <-> numpy conversions and the weight-vector convention;
- ``qos``: the QoS profiles of the graph;
- ``runner``: a node's ``main()`` (executor, signals, shutdown SUMMARY line), timers on the
  steady clock, lifecycle autostart;
- ``launch_actions``: helpers of the launch files (imports ``launch`` only when called).
"""
