"""Tests for ese_assets.core.source_ids (IAU-style JHHMMSS+DDMMSS identifiers)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ese_assets.core.source_ids import iau_source_id, iau_source_ids, parse_iau_source_id

ID_PATTERN = re.compile(r"^J([01]\d|2[0-3])[0-5]\d[0-5]\d[+-]([0-8]\d[0-5]\d[0-5]\d|900000)$")

# One second of time in degrees of RA, and one arcsecond in degrees.
SEC_DEG = 1.0 / 240.0
ARCSEC_DEG = 1.0 / 3600.0


def test_seed_example_uses_hours_not_degrees():
    # The seed printed J120000 for RA = 120 deg: degrees were treated as hours.
    assert iau_source_id(120.0, 45.0) == "J080000+450000"


@pytest.mark.parametrize(
    ("ra_deg", "dec_deg", "expected"),
    [
        (359.99999, 10.0, "J000000+100000"),  # 23h59m59.9976s rounds to 24h -> wraps to 00h
        (360.0, 0.0, "J000000+000000"),  # RA = 360 is RA = 0
        (-15.0, 0.0, "J230000+000000"),  # negative RA wraps
        (15.0 - 0.4 * SEC_DEG, 0.0, "J010000+000000"),  # 0h59m59.6s: naive code prints "0060"
        (15.0 - 0.6 * SEC_DEG, 0.0, "J005959+000000"),  # 0h59m59.4s stays
        (14.0 * 15 - 0.2 * SEC_DEG, 0.0, "J140000+000000"),  # 13h59m59.8s -> 14h
        (0.0, 1.0 - 0.3 * ARCSEC_DEG, "J000000+010000"),  # 0d59'59.7" -> 1d00'00"
        (0.0, -(30.0 - 0.2 * ARCSEC_DEG), "J000000-300000"),  # carry on a negative declination
        (0.0, -0.0001, "J000000-000000"),  # rounds to zero but stays south
        (0.0, -0.0, "J000000-000000"),  # sign bit kept, so parse -> format is a fixed point
        (0.0, -89.99999, "J000000-900000"),
        (0.0, 89.99999, "J000000+900000"),
        (0.0, 90.0, "J000000+900000"),
    ],
)
def test_rounding_and_carries(ra_deg, dec_deg, expected):
    assert iau_source_id(ra_deg, dec_deg) == expected


def test_round_half_up_on_exact_ties():
    # 0.5 s of time = 1/480 deg and 0.5 arcsec = 1/7200 deg are exact ties after scaling when the
    # products are exactly representable; choose values whose scaled totals are exactly k + 0.5.
    ra_deg = 10.5 / 240.0  # 10.5 s of time (exact: 10.5 / 240 * 240 == 10.5 in binary)
    assert ra_deg * 240.0 == 10.5
    assert iau_source_id(ra_deg, 0.0) == "J000011+000000"
    dec_deg = 0.5 / 3600.0
    assert iau_source_id(0.0, -dec_deg) == "J000000-000001"  # half away from zero in magnitude


def test_declination_capped_at_90():
    assert iau_source_id(0.0, 90.0001) == "J000000+900000"
    assert iau_source_id(0.0, -90.0001) == "J000000-900000"


def test_non_finite_coordinates_rejected():
    with pytest.raises(ValueError, match="finite"):
        iau_source_id(float("nan"), 0.0)
    with pytest.raises(ValueError, match="finite"):
        iau_source_ids([1.0, 2.0], [0.0, np.inf])


def test_custom_prefix():
    assert iau_source_id(120.0, -45.0, prefix="NVSS J") == "NVSS J080000-450000"


def test_vectorized_equals_scalar_on_random_inputs():
    rng = np.random.default_rng(20240101)
    n = 2000
    ra_deg = rng.uniform(-30.0, 390.0, n)
    dec_deg = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    # Put a quarter of the points within 1e-9 of a rounding boundary to exercise the carries.
    ra_deg[: n // 4] = np.round(ra_deg[: n // 4] * 480.0) / 480.0 - 1e-9
    dec_deg[n // 4 : n // 2] = np.round(dec_deg[n // 4 : n // 2] * 7200.0) / 7200.0 + 1e-9
    vector = iau_source_ids(ra_deg, dec_deg)
    scalar = [iau_source_id(r, d) for r, d in zip(ra_deg, dec_deg, strict=True)]
    assert vector.dtype == object
    assert vector.shape == (n,)
    assert list(vector) == scalar
    assert all(ID_PATTERN.match(s) for s in scalar)


def test_round_trip_properties():
    rng = np.random.default_rng(7)
    ra_deg = rng.uniform(0.0, 360.0, 3000)
    dec_deg = rng.uniform(-90.0, 90.0, 3000)
    ids = iau_source_ids(ra_deg, dec_deg)
    parsed = np.array([parse_iau_source_id(s) for s in ids])
    # Within half a unit of the original position (RA difference taken modulo 24 h).
    d_ra_sec = (parsed[:, 0] - ra_deg) * 240.0
    d_ra_sec = (d_ra_sec + 43_200.0) % 86_400.0 - 43_200.0
    assert np.all(np.abs(d_ra_sec) <= 0.5 + 1e-6)
    assert np.all(np.abs((parsed[:, 1] - dec_deg) * 3600.0) <= 0.5 + 1e-6)
    # Formatting the decoded position gives the same identifier: names are fixed points.
    reformatted = iau_source_ids(parsed[:, 0], parsed[:, 1])
    assert list(reformatted) == list(ids)
    for name in ("J000000-000000", "J235959+895959", "J120000-900000"):
        assert iau_source_id(*parse_iau_source_id(name)) == name


def test_parse_rejects_malformed():
    with pytest.raises(ValueError):
        parse_iau_source_id("J0800+4500")
    with pytest.raises(ValueError):
        parse_iau_source_id("J086000+450000")
