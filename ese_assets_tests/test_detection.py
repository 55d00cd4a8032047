"""Tests of ese_assets.core.detection (presets, flagging rules, composite score) and of the
candidate workflow of ese_assets.core.candidates."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ese_assets.core.candidates import plan_candidate_changes
from ese_assets.core.detection import (
    PRESETS,
    DetectionSettings,
    composite_score,
    flag_candidates,
    max_sigma_deviation,
    resolve_min_sigma,
    sigma_rule_requested,
)
from ese_assets.core.variability import variability_metrics

# ----------------------------------------- presets ------------------------------------------


def test_presets_and_resolve_min_sigma():
    assert PRESETS == {"conservative": 5.0, "moderate": 3.5, "sensitive": 3.0}
    assert resolve_min_sigma("conservative", None) == 5.0
    assert resolve_min_sigma("moderate", None) == 3.5
    assert resolve_min_sigma("Sensitive", None) == 3.0
    assert resolve_min_sigma(None, None) == 5.0
    assert resolve_min_sigma(None, 4.0) == 4.0
    assert resolve_min_sigma("sensitive", 4.2) == 4.2  # custom value overrides the preset
    with pytest.raises(ValueError, match=r"unknown detection preset 'aggressive'.*conservative"):
        resolve_min_sigma("aggressive", None)
    with pytest.raises(ValueError, match="unknown detection preset"):
        resolve_min_sigma("aggressive", 4.0)  # a typo is reported even with an override
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_sigma"):
            resolve_min_sigma(None, bad)


def test_detection_settings():
    s = DetectionSettings()
    got = (s.min_sigma, s.min_dip_sigma, s.min_obs, s.use_sigma_rule, s.use_dip_rule)
    assert got == (5.0, 6.0, 10, False, True)  # the seed rule only when asked for
    # An explicit preset or threshold switches the seed rule on.
    assert DetectionSettings.from_preset("moderate", min_obs=20) == DetectionSettings(
        min_sigma=3.5, min_obs=20, use_sigma_rule=True
    )
    assert DetectionSettings.from_preset(None, 4.0).use_sigma_rule
    assert not DetectionSettings.from_preset().use_sigma_rule
    assert sigma_rule_requested() is False
    assert sigma_rule_requested("conservative") and sigma_rule_requested(None, 5.0)
    assert sigma_rule_requested(None, None, True) and not sigma_rule_requested("moderate", 3, False)
    with pytest.raises(ValueError):
        DetectionSettings(min_obs=0)
    with pytest.raises(ValueError):
        DetectionSettings(min_dip_sigma=-1.0)
    with pytest.raises(AttributeError):
        s.min_sigma = 3.0  # frozen


def test_max_sigma_deviation_and_preset_epoch_limits():
    assert max_sigma_deviation(1) == 0.0
    assert max_sigma_deviation(4) == pytest.approx(1.5)
    np.testing.assert_allclose(
        max_sigma_deviation(np.array([2, 9, 100])), [1 / math.sqrt(2), 8 / 3, 9.9]
    )
    assert math.isnan(max_sigma_deviation(0))
    # Smallest N at which each preset can fire at all: 27, 15, 11 ((N - 1)/sqrt(N) >= threshold).
    for preset, n_min in (("conservative", 27), ("moderate", 15), ("sensitive", 11)):
        assert max_sigma_deviation(n_min) >= PRESETS[preset] > max_sigma_deviation(n_min - 1)


# ---------------------------------------- flagging ------------------------------------------


def _stats():
    return pd.DataFrame(
        {
            "source_id": ["quiet", "sig", "dip", "spike", "both", "few", "nan", "dipboth"],
            "n_obs": [100, 100, 100, 100, 100, 9, 100, 100],
            "sigma_deviation": [2.0, 5.5, 1.0, 2.0, 6.5, 9.0, np.nan, 7.0],
            "dip_significance": [-3.0, 2.0, -8.0, 6.0, 9.0, -20.0, np.nan, -7.5],
        }
    )


def test_flag_candidates_default_is_the_dip_rule_only():
    out = flag_candidates(_stats())
    got = {r.source_id: (r.flag_type, r.significance) for r in out.itertuples()}
    assert got == {
        "dip": ("dip", 8.0),
        "spike": ("spike", 6.0),
        "both": ("spike", 9.0),
        "dipboth": ("dip", 7.5),
    }


def test_flag_candidates_rules():
    out = flag_candidates(_stats(), DetectionSettings(use_sigma_rule=True))
    assert list(out.columns) == [
        "source_id",
        "significance",
        "flag_type",
        "sigma_deviation",
        "dip_significance",
    ]
    got = {r.source_id: (r.flag_type, r.significance) for r in out.itertuples()}
    assert got == {
        "sig": ("outlier", 5.5),
        "dip": ("dip", 8.0),
        "spike": ("spike", 6.0),  # threshold is inclusive
        "both": ("outlier+spike", 9.0),
        "dipboth": ("outlier+dip", 7.5),
    }
    assert out.set_index("source_id").loc["dip", "dip_significance"] == -8.0


def test_flag_candidates_switches_and_thresholds():
    only_sigma = flag_candidates(
        _stats(), DetectionSettings(use_dip_rule=False, use_sigma_rule=True)
    )
    assert dict(zip(only_sigma.source_id, only_sigma.flag_type, strict=True)) == {
        "sig": "outlier",
        "both": "outlier",
        "dipboth": "outlier",
    }
    assert only_sigma.set_index("source_id").loc["both", "significance"] == 6.5
    only_dip = flag_candidates(_stats(), DetectionSettings(use_sigma_rule=False, min_dip_sigma=7.8))
    assert dict(zip(only_dip.source_id, only_dip.flag_type, strict=True)) == {
        "dip": "dip",
        "both": "spike",
    }
    few_ok = flag_candidates(_stats(), DetectionSettings(min_obs=5, use_sigma_rule=True))
    assert "few" in set(few_ok.source_id)
    sensitive = flag_candidates(
        _stats(), DetectionSettings.from_preset("sensitive", use_dip_rule=False)
    )
    assert set(sensitive.source_id) == {"sig", "both", "dipboth"}
    assert len(flag_candidates(_stats().iloc[:0])) == 0


def test_single_outlying_epoch_is_never_a_candidate_by_default():
    # 30 clean epochs (S/N 50) plus one 20-sigma outlier: the dip scan clips it (one epoch adds at
    # most 5/sqrt(3) to S), so the default flags nothing; the seed rule, asked for, calls it an
    # outlier (sigma_deviation ~ 5.3 >= 5 at N = 31).
    rng = np.random.default_rng(7)
    mjd = 60000.0 + np.arange(31.0)
    err = np.full(31, 2.0)
    flux = 100.0 + rng.normal(0.0, 2.0, 31)
    flux[17] = 100.0 + 20 * 2.0
    lc = pd.DataFrame({"source_id": "S", "mjd": mjd, "flux_mjy": flux, "flux_err_mjy": err})
    stats = variability_metrics(lc)
    assert abs(stats["dip_significance"].iloc[0]) < DetectionSettings().min_dip_sigma
    assert len(flag_candidates(stats)) == 0
    assert len(flag_candidates(stats, DetectionSettings.from_preset())) == 0
    seed = flag_candidates(stats, DetectionSettings.from_preset("conservative"))
    assert seed["flag_type"].tolist() == ["outlier"]
    assert seed["sigma_deviation"].iloc[0] >= 5.0


def test_flag_candidates_on_metrics_output():
    # End to end on variability_metrics: a 25 % dip over 40 of 200 epochs at S/N 20 is caught by
    # the dip rule, while its sigma_deviation stays below the conservative preset.
    rng = np.random.default_rng(1)
    n = 200
    frames = []
    for sid, dip in (("A", True), ("B", False)):
        f = 100 + 5 * rng.standard_normal(n)
        if dip:
            f[80:120] -= 25
        frames.append(
            pd.DataFrame(
                {
                    "source_id": sid,
                    "mjd": np.arange(n, dtype=float),
                    "flux_mjy": f,
                    "flux_err_mjy": 5.0,
                }
            )
        )
    stats = variability_metrics(pd.concat(frames, ignore_index=True))
    assert stats.set_index("source_id").loc["A", "sigma_deviation"] < 5
    out = flag_candidates(stats, DetectionSettings())
    assert list(out.source_id) == ["A"] and out.flag_type.iloc[0] == "dip"


# ------------------------------------- composite score --------------------------------------


def test_composite_score_values():
    # score = 10 * (0.5 * clip(s,0,10)/10 + 0.3 * clip(c,0,10)/10 + 0.2 * clip(e,0,5)/5)
    cases = [
        ((10.0, 10.0, 5.0), 10.0, "high"),
        ((0.0, 0.0, 0.0), 0.0, "low"),
        ((5.0, 2.0, 1.0), 3.5, "low"),  # 2.5 + 0.6 + 0.4
        ((8.0, 5.0, 2.5), 6.5, "medium"),  # 4.0 + 1.5 + 1.0
        ((20.0, -3.0, 7.0), 7.0, "high"),  # clipped: 5 + 0 + 2; boundary inclusive
        ((8.0, 0.0, 0.0), 4.0, "medium"),  # boundary inclusive
        ((3.0, 30.0, 0.5), 4.7, "medium"),  # 1.5 + 3.0 + 0.2
    ]
    for (s, c, e), score, conf in cases:
        got_score, got_conf = composite_score(s, c, e)
        assert isinstance(got_score, float) and isinstance(got_conf, str)
        assert got_score == pytest.approx(score) and got_conf == conf, (s, c, e)
    sig = np.array([x[0][0] for x in cases])
    chi = np.array([x[0][1] for x in cases])
    eta = np.array([x[0][2] for x in cases])
    scores, confs = composite_score(sig, chi, eta)
    np.testing.assert_allclose(scores, [x[1] for x in cases])
    assert list(confs) == [x[2] for x in cases]
    nan_score, nan_conf = composite_score(np.nan, 1.0, 1.0)
    assert math.isnan(nan_score) and nan_conf == "low"


# ------------------------------------ candidate workflow ------------------------------------

NOW = 1_700_000_000.0


def _flagged(*rows):
    return pd.DataFrame(
        rows,
        columns=["source_id", "significance", "flag_type", "sigma_deviation", "dip_significance"],
    )


def _existing(*rows):
    return pd.DataFrame(rows, columns=["id", "source_id", "status", "significance", "dismissed_at"])


class _Table:
    """Minimal in-memory ese_candidates table applying planned inserts/updates (test helper)."""

    def __init__(self):
        self.rows: dict[int, dict] = {}

    def apply(self, inserts, updates):
        for u in updates:
            self.rows[u["id"]].update({k: v for k, v in u.items() if k != "id"})
        for ins in inserts:
            new_id = max(self.rows, default=0) + 1
            self.rows[new_id] = {"id": new_id, "dismissed_at": None, **ins}

    def existing(self):
        return _existing(
            *[
                (r["id"], r["source_id"], r["status"], r["significance"], r["dismissed_at"])
                for r in self.rows.values()
            ]
        )


def test_new_source_is_inserted():
    ins, upd = plan_candidate_changes(
        _flagged(("S1", 7.0, "dip", 2.0, -7.0)), _existing(), night="2025-01-02", now=NOW
    )
    assert upd == []
    assert ins == [
        {
            "source_id": "S1",
            "flagged_at": NOW,
            "flagged_by": "auto",
            "significance": 7.0,
            "flag_type": "dip",
            "status": "active",
            "night": "2025-01-02",
            "last_night": "2025-01-02",
            "sigma_deviation": 2.0,
            "dip_significance": -7.0,
            "notes": None,
        }
    ]
    assert all(type(v) in (str, float, type(None)) for v in ins[0].values())
    assert plan_candidate_changes(_flagged(), _existing(), night="x", now=NOW) == ([], [])
    assert (
        plan_candidate_changes(
            _flagged(("S1", 7.0, "dip", np.nan, -7.0)), None, night="n", now=NOW
        )[0][0]["sigma_deviation"]
        is None
    )


@pytest.mark.parametrize("status", ["active", "investigated"])
def test_open_candidate_is_updated_status_unchanged(status):
    existing = _existing((11, "S1", "dismissed", 6.0, NOW - 1e6), (12, "S1", status, 6.5, None))
    ins, upd = plan_candidate_changes(
        _flagged(("S1", 8.0, "sigma_deviation+dip", 5.2, -8.0)),
        existing,
        night="2025-01-03",
        now=NOW,
    )
    assert ins == []
    assert upd == [
        {
            "id": 12,
            "significance": 8.0,
            "flag_type": "sigma_deviation+dip",
            "sigma_deviation": 5.2,
            "dip_significance": -8.0,
            "last_night": "2025-01-03",
        }
    ]
    assert "status" not in upd[0]  # an investigated candidate stays investigated


def test_dismissed_candidate_stays_dismissed_unless_significance_grows():
    existing = _existing((5, "S1", "dismissed", 8.0, NOW - 86400.0))
    for sig in (6.0, 8.0, 9.99):
        assert plan_candidate_changes(
            _flagged(("S1", sig, "dip", 1.0, -sig)), existing, night="n", now=NOW
        ) == ([], [])
    ins, upd = plan_candidate_changes(
        _flagged(("S1", 10.0, "dip", 1.0, -10.0)), existing, night="2025-02-01", now=NOW
    )  # 10 >= 1.25 x 8
    assert upd == [] and len(ins) == 1
    assert ins[0]["status"] == "active" and ins[0]["significance"] == 10.0
    assert "dismiss" in ins[0]["notes"] and "8.00" in ins[0]["notes"] and "id 5" in ins[0]["notes"]
    # A custom regrow factor.
    ins2, _ = plan_candidate_changes(
        _flagged(("S1", 9.0, "dip", 1.0, -9.0)), existing, night="n", now=NOW, regrow_factor=1.1
    )
    assert len(ins2) == 1
    # Only the most recent dismissal counts: an older, weaker dismissal does not lower the bar.
    two = _existing((5, "S1", "dismissed", 4.0, NOW - 2e6), (9, "S1", "dismissed", 8.0, NOW - 1e6))
    flagged = _flagged(("S1", 7.0, "dip", 1.0, -7.0))
    assert plan_candidate_changes(flagged, two, night="n", now=NOW) == ([], [])


def test_workflow_is_idempotent_and_mixed_batch():
    table = _Table()
    table.apply(
        [
            {
                "source_id": "OLD",
                "flagged_at": 1.0,
                "flagged_by": "auto",
                "significance": 6.0,
                "flag_type": "dip",
                "status": "dismissed",
                "night": "2024-12-01",
                "last_night": "2024-12-01",
                "sigma_deviation": 1.0,
                "dip_significance": -6.0,
                "notes": None,
            }
        ],
        [],
    )
    table.apply(
        [
            {
                "source_id": "INV",
                "flagged_at": 1.0,
                "flagged_by": "alice",
                "significance": 5.0,
                "flag_type": "sigma_deviation",
                "status": "investigated",
                "night": "2024-12-01",
                "last_night": "2024-12-01",
                "sigma_deviation": 5.0,
                "dip_significance": 1.0,
                "notes": "looks real",
            }
        ],
        [],
    )
    flagged = _flagged(
        ("NEW", 7.0, "dip", 2.0, -7.0),
        ("INV", 5.5, "sigma_deviation", 5.5, 1.0),
        ("OLD", 7.4, "dip", 1.0, -7.4),
        ("GROWN", 6.1, "spike", 1.0, 6.1),
    )
    table.apply(
        [
            {
                "source_id": "GROWN",
                "flagged_at": 1.0,
                "flagged_by": "auto",
                "significance": 4.0,
                "flag_type": "dip",
                "status": "dismissed",
                "night": "2024-12-01",
                "last_night": "2024-12-01",
                "sigma_deviation": 1.0,
                "dip_significance": -4.0,
                "notes": None,
            }
        ],
        [],
    )
    ins, upd = plan_candidate_changes(flagged, table.existing(), night="2025-01-05", now=NOW)
    assert sorted(i["source_id"] for i in ins) == ["GROWN", "NEW"]  # OLD: 7.4 < 1.25 x 6
    assert [u["id"] for u in upd] == [2]
    table.apply(ins, upd)
    assert table.rows[2]["status"] == "investigated" and table.rows[2]["notes"] == "looks real"
    assert table.rows[2]["last_night"] == "2025-01-05" and table.rows[2]["night"] == "2024-12-01"
    snapshot = {k: dict(v) for k, v in table.rows.items()}

    ins2, upd2 = plan_candidate_changes(flagged, table.existing(), night="2025-01-05", now=NOW + 60)
    assert ins2 == []
    assert sorted(u["id"] for u in upd2) == sorted(
        k
        for k, r in table.rows.items()
        if r["source_id"] in {"NEW", "INV", "GROWN"} and r["status"] != "dismissed"
    )
    table.apply(ins2, upd2)
    assert table.rows == snapshot  # identical values: nothing changed

    # Sources not flagged tonight are left alone.
    assert plan_candidate_changes(_flagged(), table.existing(), night="2025-01-06", now=NOW) == (
        [],
        [],
    )


def test_rerunning_an_older_night_keeps_the_latest_confirming_night():
    flagged = pd.DataFrame(
        {
            "source_id": ["A"],
            "significance": [9.0],
            "flag_type": ["dip"],
            "sigma_deviation": [2.0],
            "dip_significance": [-9.0],
        }
    )
    existing = pd.DataFrame(
        {
            "id": [1],
            "source_id": ["A"],
            "status": ["active"],
            "significance": [9.0],
            "dismissed_at": [None],
            "last_night": ["2025-01-03"],
        }
    )
    _, updates = plan_candidate_changes(flagged, existing, night="2025-01-02", now=0.0)
    assert updates[0]["last_night"] == "2025-01-03"
    _, updates = plan_candidate_changes(flagged, existing, night="2025-01-04", now=0.0)
    assert updates[0]["last_night"] == "2025-01-04"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"ESE_PRESET": "moderate"}, True),
        ({"ESE_MIN_SIGMA": "4"}, True),
        ({"ESE_USE_SIGMA_RULE": "1"}, True),
        ({"ESE_PRESET": "moderate", "ESE_USE_SIGMA_RULE": "0"}, False),
    ],
)
def test_settings_switch_the_seed_rule_from_the_environment(monkeypatch, tmp_path, env, expected):
    from ese_assets.orchestration.resources import resources_from_settings
    from ese_assets.settings import Settings

    for name in ("ESE_PRESET", "ESE_MIN_SIGMA", "ESE_USE_SIGMA_RULE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ESE_DATA_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert settings.detection().use_sigma_rule is expected
    resource = resources_from_settings(settings, bind_env=False)["detection"]
    assert resource.settings().use_sigma_rule is expected


def test_settings_reject_a_bad_use_sigma_rule(monkeypatch, tmp_path):
    from ese_assets.settings import Settings

    monkeypatch.setenv("ESE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ESE_USE_SIGMA_RULE", "maybe")
    with pytest.raises(ValueError, match="ESE_USE_SIGMA_RULE"):
        Settings.from_env()
