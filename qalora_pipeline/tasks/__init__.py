"""The pipeline's stages as Prefect tasks: each one calls its core stage function (``qalora.<stage>``),
which writes the stage folder and its manifest, inside a content-addressed folder (:mod:`.stage_cache`)."""
