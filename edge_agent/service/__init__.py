"""The agent as a long-running service: ``agent`` wires the frame path to the publisher and owns the
threads; ``health`` and ``metrics`` say how it is doing; ``http_server`` serves /healthz, /metrics and
the ``preview`` page (the watchdog is ``edge_agent.systemd``); ``snapshot`` saves one frame for people.
The line-to-model loop (``loop``, ``loop_metrics``): ``keep`` (flagged frames on disk), ``recorder``
(good images for training), ``review`` and ``review_page`` (false alarms back to training).
"""
