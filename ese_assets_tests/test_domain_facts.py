"""Each domain fact is named once and the rest of the system follows it: the database CHECK
constraints and the open-candidate index come from the status tuples, the sums tables from the
sums columns of core.variability, and every unusable input raises one error type."""

from __future__ import annotations

import pandas as pd
import pytest
import sqlalchemy as sa

from ese_assets.core.candidates import (
    CANDIDATE_STATUSES,
    EXPIRED_STATUS,
    OPEN_STATUSES,
    REVIEW_STATUSES,
    review_update,
)
from ese_assets.core.catalog import CatalogError, load_catalog
from ese_assets.core.errors import InputError
from ese_assets.core.fits_image import ImageError, load_image
from ese_assets.core.sums import COUNT_COLUMNS, LATER_SUM_COLUMNS
from ese_assets.core.variability import EXTREME_COLUMNS, SUM_COLUMNS
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.schema import (
    IMAGE_STATUSES,
    ese_candidates,
    images,
    source_night_sums,
    source_sums,
)


def _insert_image(engine, path: str, status: str) -> None:
    with engine.begin() as conn:
        conn.execute(images.insert(), [{"path": path, "status": status, "registered_at": 1.0}])


def test_image_check_constraint_is_the_status_tuple(engine):
    for status in IMAGE_STATUSES:  # every named status is accepted by the database itself
        _insert_image(engine, f"/in/{status}.fits", status)
    with pytest.raises(sa.exc.IntegrityError):
        _insert_image(engine, "/in/bad.fits", "done")


def test_candidate_check_constraint_and_open_index_follow_the_workflow(engine):
    statistics_db.upsert_variability_stats(engine, _stats(["S1", "S2"]))

    def insert(source_id: str, status: str) -> None:
        with engine.begin() as conn:
            conn.execute(
                ese_candidates.insert(),
                [
                    {
                        "source_id": source_id,
                        "flagged_at": 1.0,
                        "significance": 7.0,
                        "flag_type": "dip",
                        "status": status,
                    }
                ],
            )

    closed = [s for s in CANDIDATE_STATUSES if s not in OPEN_STATUSES]
    for status in closed * 2:
        insert("S1", status)  # any number of closed rows per source
    insert("S2", OPEN_STATUSES[0])
    for status in OPEN_STATUSES:  # a second open row of the source, whatever its open status
        with pytest.raises(sa.exc.IntegrityError):
            insert("S2", status)
    with pytest.raises(sa.exc.IntegrityError):
        insert("S1", "open")  # not a status
    shown = candidates_db.candidates(engine, status=OPEN_STATUSES)
    assert shown["source_id"].tolist() == ["S2"]


def _stats(source_ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"source_id": source_ids, "ra_deg": 10.0, "dec_deg": 20.0, "n_obs": 12})


def test_sums_tables_have_the_sums_columns_of_the_science_core():
    for table in (source_night_sums, source_sums):
        for column in SUM_COLUMNS:
            # sums added after the first release can be added to older databases: nullable,
            # or (counts) NOT NULL with a server default
            col = table.c[column]
            later = column in LATER_SUM_COLUMNS
            assert col.nullable == (later and column not in COUNT_COLUMNS)
            assert not later or col.nullable or col.server_default is not None
        for column in EXTREME_COLUMNS:
            assert column in table.c
    counts = {c for c in SUM_COLUMNS if isinstance(source_sums.c[c].type, sa.Integer)}
    assert counts == {"n_obs", "n_bad_err", "n_bad_quoted_err"}


def test_review_update_is_the_audit_trail():
    values = review_update(
        "dismissed", old_notes="flagged", notes="RFI", by="ann", now=1_700_000_000.0
    )
    assert values == {
        "status": "dismissed",
        "dismissed_at": 1_700_000_000.0,
        "notes": "flagged\n2023-11-14T22:13:20Z ann: dismissed: RFI",
    }
    assert review_update("investigated", old_notes=None, notes=None, by="bo", now=0.0) == {
        "status": "investigated",
        "investigated_at": 0.0,
        "notes": "1970-01-01T00:00:00Z bo: investigated",
    }
    # people review open candidates; "expired" is set by detection only
    assert set(REVIEW_STATUSES) == set(CANDIDATE_STATUSES) - {"active", EXPIRED_STATUS}
    with pytest.raises(ValueError, match="'active'"):
        review_update("active", old_notes=None, notes=None, by="x", now=0.0)


def test_unusable_inputs_raise_one_error_type(tmp_path):
    not_fits = tmp_path / "notes.fits"
    not_fits.write_text("this is not a FITS file\n")
    with pytest.raises(InputError) as image_err:
        load_image(not_fits)
    assert isinstance(image_err.value, ImageError) and isinstance(image_err.value, ValueError)
    assert image_err.value.path == str(not_fits)
    assert str(image_err.value) == f"{not_fits}: {image_err.value.reason}"

    catalog = tmp_path / "bad_catalog.csv"
    catalog.write_text("name,ra_deg,dec_deg,flux_mjy\nA,10,95,3\n")  # |Dec| > 90
    with pytest.raises(InputError) as catalog_err:
        load_catalog(catalog)
    assert isinstance(catalog_err.value, CatalogError)
    assert str(catalog_err.value) == f"{catalog}: {catalog_err.value.reason}"
    assert "95" in catalog_err.value.reason
