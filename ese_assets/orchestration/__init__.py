"""Dagster definitions: thin wrappers that call :mod:`ese_assets.pipeline` and report metadata."""

import warnings

import dagster as dg

# Two features Dagster labels beta/preview are used on purpose: asset backfill policies (to batch
# date-range backfills) and partitioned asset checks. Without this filter their warnings repeat in
# every process that loads the definitions (webserver, daemon, each run).
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
