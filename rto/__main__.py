"""`python -m rto <command>`, also under `torchrun -m rto`."""

import os
import sys

from rto.cli import main

code = main()
if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
    # A torchrun rank that has finished (its process group already ended by `main`) leaves without the
    # interpreter's final teardown, where native threads of the distributed runtime were seen to abort a finished
    # run ("terminate called without an active exception", SIGABRT: a non-zero exit after "done"). atexit
    # handlers and stream flushes still run; only the native teardown is skipped.
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
sys.exit(code)
