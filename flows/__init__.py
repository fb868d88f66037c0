"""The product's commands and Prefect flows: thin layers over plain jobs, MLflow as the registry.

``cli``
    The ``msdda`` console script: options and input checked before any work, then a job or a flow.
``jobs``
    The jobs as plain functions (train and register, resolve, compose, sweep), each logging an MLflow run.
``pipeline``
    The Prefect flows over the jobs, each flow's work in a task; ``retries`` says which failures retry.
``deploy``
    Prefect deployments: scheduled training, on-demand composition.
``registry`` and ``tracking``
    The MLflow model registry (versions, lineage, the ``champion`` alias) and MLflow runs and stores.
``prefect_api``
    The Prefect API a command needs, made sure of before any expensive work.
``failures``
    How a failed command reports: one line, the right exit code.
``ui``
    ``msdda ui``: the MLflow UI on the configured store.
"""
