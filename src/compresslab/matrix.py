"""Which method runs on which model family: the support matrix.

Each method config names the model families it runs on (``models:`` in
``configs/method/<name>.yaml``) and each model config its family (``family:``).
A run of a pair outside the matrix stops before any work with one line naming the
families the method supports. The README's matrix table and the test that runs every
supported pair are generated from the same method configs, so the three cannot drift.

    python -m compresslab.matrix          # the matrix as a markdown table
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from compresslab.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: the model families users name, in the matrix's column order (configs/model/<family>.yaml)
FAMILIES = ("llama", "vit", "dln", "mlp", "ar_image")
#: the matrix's row order: baselines first, then each paper's methods
METHODS = ("none", "train", "svd", "fwsvd", "asvd", "svd_llm", "svd_llm_ft", "spectrum",
           "pela", "numerical_pruning", "magnitude_prune", "wanda_prune", "flap", "soka",
           "lora", "pissa", "lokr", "dln_original", "dln_compressed")
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"


def supported_families(method: str, configs: Path = CONFIGS) -> list[str]:
    """The ``models:`` list of ``configs/method/<method>.yaml``."""
    node = OmegaConf.load(configs / "method" / f"{method}.yaml")
    return list(node.get("models") or [])


def support(configs: Path = CONFIGS) -> dict[str, list[str]]:
    """method -> the model families it runs on, for every method config."""
    names = sorted(p.stem for p in (configs / "method").glob("*.yaml"))
    ordered = [m for m in METHODS if m in names] + [m for m in names if m not in METHODS]
    return {m: supported_families(m, configs) for m in ordered}


def check_pair(cfg: DictConfig) -> None:
    """Refuse a method x model pair outside the matrix (a method config without
    ``models:`` or a model without ``family:`` is not checked)."""
    family = cfg.model.get("family")
    allowed = cfg.method.get("models")
    if family is None or allowed is None or family in allowed:
        return
    names = ", ".join(f"model={f}" for f in allowed) or "none"
    raise ConfigError(f"method={cfg.method.name} does not run on model={cfg.model.name} "
                      f"(family {family}); it runs on {names} (docs/matrix.md)")


def markdown(configs: Path = CONFIGS) -> str:
    """The matrix as a markdown table: ✓ where the pair runs, · where it is refused."""
    rows = ["| method | " + " | ".join(FAMILIES) + " |",
            "|---|" + "---|" * len(FAMILIES)]
    for method, families in support(configs).items():
        marks = ("✓" if f in families else "·" for f in FAMILIES)
        rows.append(f"| `{method}` | " + " | ".join(marks) + " |")
    return "\n".join(rows)


def embedded_block(text: str) -> str:
    """The table between the matrix markers of a markdown file's ``text``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    print(markdown())
