"""Science core: pure functions on numpy arrays and astropy objects; no Dagster, no database."""
