"""Where the work runs: the Dask cluster a job starts or joins, which workers take CPU or GPU work, and how
a stage's tiles are grouped into Dask tasks."""
