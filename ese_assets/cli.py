"""Command line interface (placeholder entry point replaced by the lead)."""
def main() -> None:  # pragma: no cover
    raise SystemExit("ese: CLI is being assembled")
