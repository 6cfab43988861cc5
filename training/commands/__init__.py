"""The ``uflow`` commands, one module each (``add_arguments(parser)``, ``run(args) -> int``), registered in
training/cli.py."""
