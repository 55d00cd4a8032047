"""The executor of the pipeline job, chosen by ``ESE_EXECUTOR``.

* ``in_process`` (default): the three steps of a run execute in the run's own process (~0.3 s of
  overhead per run; the photometry step measures the images with a process pool, see
  :mod:`ese_assets.pipeline.parallel`).
* ``celery``: each step is a Celery task (``dagster-celery``, the ``distributed`` extra) executed
  by whichever worker takes it from the broker (``ESE_CELERY_BROKER``), on this host or another.
  Runs of several nights then spread over every worker of the cluster. Steps of one run still
  execute one after the other (each needs the previous one's tables). Workers must see the same
  products database, catalog and images, and the Dagster instance must be one they share:
  PostgreSQL storage (``dagster-postgres.yaml``). Workers are started with ``dagster-celery
  worker start -A dagster_celery.app -y dagster-celery.yaml`` (README "Past one machine").
"""

from __future__ import annotations

import os

import dagster as dg

from ese_assets.settings import Settings

#: Environment variable of the broker URL: the job's executor config reads it from there when it
#: is set (so a password in it is not copied into the job's snapshot), like the workers do.
BROKER_ENV = "ESE_CELERY_BROKER"


def pipeline_executor(settings: Settings) -> dg.ExecutorDefinition:
    """The executor ``settings.executor`` names, configured from ``settings``."""
    if settings.executor == "in_process":
        return dg.in_process_executor
    try:
        from dagster_celery import celery_executor
    except ImportError:
        raise ValueError(
            "ESE_EXECUTOR=celery needs dagster-celery: pip install -c requirements.lock -e "
            "'.[distributed]'"
        ) from None
    broker = {"env": BROKER_ENV} if os.environ.get(BROKER_ENV, "").strip() else None
    return celery_executor.configured(
        {
            "broker": broker or settings.celery_broker,
            "backend": settings.celery_backend,
            # the queue the steps are sent to; workers listen on it (`-q`)
            "config_source": {"task_default_queue": settings.celery_queue},
        },
        name="celery",
    )
