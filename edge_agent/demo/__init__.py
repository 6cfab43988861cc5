"""The demo's world: a generated conveyor video (``conveyor``, ``synthetic``) and a local broker
(``local_broker``, also used by the tests). ``edge-agent demo`` itself is ``edge_agent.cli.demo``.
"""
