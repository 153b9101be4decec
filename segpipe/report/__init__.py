"""Scores against ground truth: truth checking and rasterising, per-tile confusion matrices, the report
tables (CSV, JSON, GeoJSON, terminal) and the self-contained HTML report."""
