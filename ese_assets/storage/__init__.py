"""Storage layer: SQLAlchemy Core tables and the functions that read and write them."""
