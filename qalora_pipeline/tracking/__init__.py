"""MLflow tracking and the model registry of the qalora pipeline.

* ``configure``         tracking + registry URI (default: sqlite under ``$QALORA_HOME/mlflow``), experiment
                        (:mod:`.store`).
* ``pipeline_run``      one parent run per pipeline run, a nested run per stage (:mod:`.run`).
* ``register_and_gate`` logs the merged low-bit folder as a pyfunc model ("models from code",
                        :mod:`.lowbit_pyfunc`), registers a version, aliases it ``challenger``, tags it with the
                        decision, the failed rules and the lineage, and moves ``champion`` to it when the
                        gate passed: the pipeline's automatic promotion (:mod:`.promotion`).
* ``champion``          the current ``@champion`` version's figures and lineage (None when none).
* ``gate_version``      read-only: the decision a version would get against the current champion.
* ``promote``           the one manual way to move ``champion`` (refuses a failing version unless forced).
* ``rollback``          ``champion`` back to ``previous-champion``.
* ``audit_log``         every champion move, oldest first (:mod:`.registry`, which documents the aliases,
                        the version tags and the audit log).
"""

from qalora_pipeline.tracking.promotion import champion, gate_version, promote, register_and_gate, rollback, version_figures
from qalora_pipeline.tracking.registry import (
    CHALLENGER, CHAMPION, PREVIOUS_CHAMPION, PromotionRefused, RegistryError, audit_log, current_user,
    log_lowbit_model, resolve_version,
)
from qalora_pipeline.tracking.run import PipelineRun, pipeline_run
from qalora_pipeline.tracking.store import configure, default_uri, flatten, lineage_tags

__all__ = [
    "CHALLENGER", "CHAMPION", "PREVIOUS_CHAMPION", "PipelineRun", "PromotionRefused", "RegistryError", "audit_log",
    "champion", "configure", "current_user", "default_uri", "flatten", "gate_version", "lineage_tags",
    "log_lowbit_model", "pipeline_run", "promote", "register_and_gate", "resolve_version", "rollback",
    "version_figures",
]
