"""qalora_pipeline: the orchestration around the core library ``qalora`` (docs/design.md).

The ``qalora`` command line (:mod:`.cli`), the Prefect flow (:mod:`.flows`) and its tasks (:mod:`.tasks`),
MLflow tracking and the model registry (:mod:`.tracking`), DVC data versioning (:mod:`.data_version`) and
``qalora rebuild`` (:mod:`.rebuild`). It imports ``qalora``; ``qalora`` never imports it. Importing this
package imports nothing: each stage's code version hashes only what its task module imports.
"""
