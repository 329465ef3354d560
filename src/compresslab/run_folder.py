"""Names of the files a run leaves in its folder (see :mod:`compresslab.resume` for
what each holds and how a run continues from them). A module of its own so that low-level
code (signal handling, file-system errors) can name them without importing the resume
logic."""

STATE_FILE = "run_state.json"
STATE_FORMAT = "compresslab-run/1"
