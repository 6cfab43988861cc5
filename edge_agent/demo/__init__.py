"""``edge-agent demo`` (edge_agent/cli/demo.py parses its arguments): the flow (``flow``), its world (a generated
conveyor video: ``conveyor``, ``synthetic``; a local broker: ``local_broker``, also used by the tests) and step 5
in tracked mode (``line``: the real reject relay and a watcher) or frames mode (``frames``).
"""
