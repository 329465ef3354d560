"""Names of the files a run leaves in its folder (see :mod:`compresslab.resume` for
what each holds and how a run continues from them). A module of its own so that low-level
code (signal handling, file-system errors) can name them without importing the resume
logic."""

STATE_FILE = "run_state.json"
STATE_FORMAT = "compresslab-run/1"


def stage_key(index: int, name: str) -> str:
    """``<index>-<name>``: unique in a run, names the stage's checkpoint and saved folders."""
    return f"{index:02d}-{name}"
