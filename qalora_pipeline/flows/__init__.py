"""The Prefect flow of the pipeline (``pipeline.py``, the deployment entrypoint) and the local server ``qalora serve`` starts."""
