"""ese_assets: a Dagster data-asset pipeline for finding Extreme Scattering Events (ESEs).

Layers (dependencies point downward only):

* ``ese_assets.core``: science on numpy arrays and astropy objects (no Dagster, no SQL).
* ``ese_assets.storage``: SQLAlchemy Core tables and the functions that read and write them.
* ``ese_assets.orchestration``: Dagster partitions, assets, checks, jobs, sensor, schedule.
* ``ese_assets.cli`` and ``ese_assets.api``: the command line and the Python API.
"""

__version__ = "0.1.0"
