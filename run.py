"""Entry point: ``python run.py method=svd model=llama_tiny dataset=pycode``.

Thin by design: Hydra composes the config, :func:`compresslab.pipeline.run`
does the work. A bad setting ends with one line on stderr and exit code 2, a
numerical fault (NaN/Inf loss, a matrix no repair could factorise) with one line
and exit code 1. ``resume=<run folder>`` continues an interrupted run in its folder.
"""

import sys

import hydra
from omegaconf import DictConfig

import compresslab  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from compresslab.distributed import end_job, pin_job_for_relaunch
    from compresslab.errors import ConfigError
    from compresslab.models.architecture import UnknownArchitectureError
    from compresslab.pipeline import run

    try:
        if cfg.get("resume"):
            from hydra.core.hydra_config import HydraConfig

            from compresslab.resume import resume_config

            cfg = resume_config(cfg, list(HydraConfig.get().overrides.task))
        pin_job_for_relaunch(__file__)  # multirun + DDP: other processes re-run this job only
        try:
            metrics = run(cfg)
        finally:
            end_job()
    except (ConfigError, UnknownArchitectureError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as exc:  # NaN/Inf loss, failed matrix repair
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # a full, read-only or size-limited file system: one line, exit 1
        from compresslab.filesystem import exit_if_write_failure

        exit_if_write_failure(exc)
    # the value Hydra sweepers optimise: the task's primary metric on the test split
    return metrics.get(cfg.get("objective", ""))


def command_line(argv: list[str]) -> list[str]:
    """The arguments for Hydra, after the run-folder checks that must come before Hydra
    writes anything (see :func:`compresslab.resume.prepare_command_line`)."""
    from compresslab.errors import ConfigError
    from compresslab.resume import prepare_command_line

    try:
        return prepare_command_line(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from compresslab.filesystem import exit_on_write_failure
    from compresslab.interrupt import exit_on_signal

    # SIGTERM/SIGINT/SIGHUP: exit 128+N, loggers closed; a full or read-only disk: exit 1;
    # either with one line saying how to resume
    with exit_on_signal(), exit_on_write_failure():
        sys.argv = [sys.argv[0], *command_line(sys.argv[1:])]
        main()
