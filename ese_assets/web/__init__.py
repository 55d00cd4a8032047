"""The candidate review web app and the seed's REST API, on one HTTP server (FastAPI + uvicorn).

``python -m ese_assets.web`` (or ``make ui``, which also starts the Dagster UI) serves
``PIPELINE_PRODUCTS_DB`` on http://127.0.0.1:8000: the review pages (``/candidates``,
``/sources/{id}``, ``/eta-v``), the REST API (``/api/...``, described at ``/openapi.json``) and
detection runs launched as Dagster runs. Modules: :mod:`.config` (where it listens, the write
token), :mod:`.app` (the application and the write rule), :mod:`.api` (REST routes),
:mod:`.models` (request and response bodies), :mod:`.pages` (HTML pages), :mod:`.queries` (reads),
:mod:`.formats` (CSV, VOTable), :mod:`.jobs` (detection runs), :mod:`.server` (the command).
"""
