"""Exit statuses, one spelling for every command of ``edge-agent`` and ``uflow`` (systemd units and
scripts test them):

- ``EXIT_OK`` 0: done, or a clean stop;
- ``EXIT_FAILURE`` 1: the work failed (the log says why);
- ``EXIT_CONFIG`` 2: a configuration error (also argparse's status for bad arguments);
- ``EXIT_UNAVAILABLE`` 3: the requested backend or tool is not installed here;
- ``EXIT_NO_GPU`` 4: TensorRT is installed but no GPU can be opened;
- ``EXIT_LOCKED`` 75 (EX_TEMPFAIL): another process holds the lock; try again later;
- ``EXIT_STOPPED`` 130: stopped by SIGINT/SIGTERM before the work was done;
- ``EXIT_BROKEN_PIPE`` 141 (128 + SIGPIPE, what a shell reports for ``cmd | head``): the reader of stdout
  went away; no traceback.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3
EXIT_NO_GPU = 4
EXIT_LOCKED = 75
EXIT_STOPPED = 130
EXIT_BROKEN_PIPE = 141
