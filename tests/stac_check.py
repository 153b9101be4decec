"""STAC documents validated offline with stac-validator (the ``stac_valid`` package), every schema from disk.

Core STAC 1.1.0 and the GeoJSON schemas come from pystac's package (``pystac/validation/jsonschemas``); the
extensions' schemas are vendored in ``tests/data/stac_schemas/`` (its README says where each came from). The
validator is given them through its ``schema_map``, and any URL it would still fetch fails the check: nothing is
fetched from the network.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

SCHEMAS = Path(__file__).parent / "data" / "stac_schemas"


def schema_map() -> dict[str, str]:
    """Schema URL -> local file, for core STAC 1.1.0, GeoJSON and every vendored extension."""
    import pystac.validation

    core = Path(pystac.validation.__file__).parent / "jsonschemas"
    found: dict[str, str] = {}
    for f in (core / "stac-spec" / "v1.1.0").glob("*.json"):
        spec = {"catalog": "catalog-spec", "collection": "collection-spec"}.get(f.stem, "item-spec")
        found[f"https://schemas.stacspec.org/v1.1.0/{spec}/json-schema/{f.name}"] = str(f)
    for f in (core / "geojson").glob("*.json"):
        found[f"https://geojson.org/schema/{f.name}"] = str(f)
    for f in SCHEMAS.glob("*.json"):
        name, version = f.stem.rsplit("-v", 1)
        found[f"https://stac-extensions.github.io/{name}/v{version}/schema.json"] = str(f)
    return found


@contextlib.contextmanager
def offline() -> Iterator[list[str]]:
    """Every URL the validator tries to open is recorded and refused (the list it yields must stay empty)."""
    import requests

    tried: list[str] = []

    def refuse(url: Any, *_a: Any, **_k: Any) -> Any:
        tried.append(str(getattr(url, "full_url", url)))
        raise OSError(f"the STAC check went to the network: {url}")

    with mock.patch.object(requests, "get", refuse), mock.patch.object(requests.Session, "request", refuse), \
            mock.patch.object(urllib.request, "urlopen", refuse):
        yield tried


def validate(path: Path, recursive: bool = False) -> tuple[bool, list[dict[str, Any]]]:
    """stac-validator's default check (core and every extension the document declares) of ``path``, offline;
    with ``recursive``, a Collection and every Item it links. Returns (valid, the validator's messages)."""
    from stac_validator import stac_validator

    with offline() as tried:
        v = stac_validator.StacValidate(str(path), schema_map=schema_map(), recursive=recursive, verbose=True)
        valid = v.run()
    assert not tried, f"the validator tried the network: {tried}"
    return bool(valid), v.message
