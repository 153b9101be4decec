"""Objects across tiles: connected-component instances and the watershed split, joined over tile borders
with one union-find, then measured and matched against true objects."""
