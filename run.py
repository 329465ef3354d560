"""Entry point: ``python run.py method=svd model=llama_tiny dataset=pycode``.

Thin by design: Hydra composes the config, :func:`compresslab.pipeline.run`
does the work. A bad setting ends with one line on stderr and exit code 2.
"""

import sys

import hydra
from omegaconf import DictConfig

import compresslab  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from compresslab.errors import ConfigError
    from compresslab.models.adapters import UnknownArchitectureError
    from compresslab.pipeline import run

    try:
        metrics = run(cfg)
    except (ConfigError, UnknownArchitectureError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    # the value Hydra sweepers optimise: the task's primary metric on the test split
    return metrics.get(cfg.get("objective", ""))


if __name__ == "__main__":
    main()
