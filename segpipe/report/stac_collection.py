"""``collection.json``: a STAC Collection over runs that each wrote their Item (:mod:`segpipe.report.stac_item`).

Why: a land-cover series (one Item per period) and an archive (one Item per item of the input) are what users
load as one stack (``odc.stac.load`` over the Collection's Items) or browse (STAC Browser). The Collection is
written at the series' or archive's root, its Items stay where their runs wrote them, and every link is relative
(a self-contained catalog: no self links), so the folder can be copied to object storage as it is.

The Collection is made anew from the Items found on disk each time (a period or an item that finished earlier,
or a rerun's new Item, is always listed as it is now), and written atomically, only where it changed. Two
periods finishing at the same moment may each write it; one may miss the other's Item until the next write.

Also here: :func:`add_assets`, which adds files made after a run (a period's class areas and change maps) to its
Item, checksummed like the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segpipe.io.store import write_atomic
from segpipe.report.stac_item import add_asset, item_document

COLLECTION = "collection.json"


def add_assets(item_path: Path, files: list[Path], classes: dict[str, dict[int, str]] | None = None) -> Path:
    """Add ``files`` (those that exist, under the Item's folder) to the Item at ``item_path`` and rewrite it."""
    import pystac

    item = pystac.Item.from_file(str(item_path))
    item.set_self_href(str(Path(item_path).resolve()))
    for path in files:
        if Path(path).exists():
            add_asset(item, Path(item_path).parent, Path(path), classes)
    item.make_asset_hrefs_relative()
    write_atomic(Path(item_path), json.dumps(item_document(item), indent=2))
    return Path(item_path)


def write_collection(root: Path, collection_id: str, description: str, item_paths: list[Path],
                     title: str | None = None, extra: dict[str, Any] | None = None) -> Path | None:
    """Write ``root/collection.json`` over the Items at ``item_paths`` (those that exist) and link each Item back
    to it; None (and nothing written) when there is no Item."""
    import pystac

    root = Path(root).resolve()
    paths = sorted(Path(p).resolve() for p in item_paths if Path(p).is_file())
    if not paths:
        return None
    items = [pystac.Item.from_file(str(p)) for p in paths]
    for item, path in zip(items, paths, strict=True):
        item.set_self_href(str(path))
        item.make_asset_hrefs_absolute()
    extent = pystac.Extent.from_items(items)
    collection = pystac.Collection(collection_id, description, extent, title=title, extra_fields=extra or {},
                                   catalog_type=pystac.CatalogType.SELF_CONTAINED)
    collection.set_self_href(str(root / COLLECTION))
    for item in items:
        collection.add_item(item)  # keeps the Item's own href: it stays where its run wrote it
    for item, path in zip(items, paths, strict=True):
        item.set_self_href(str(path))
        item.make_asset_hrefs_relative()
        _write_changed(path, json.dumps(item.to_dict(include_self_link=False, transform_hrefs=True), indent=2))
    doc = collection.to_dict(include_self_link=False, transform_hrefs=True)
    _write_changed(root / COLLECTION, json.dumps(doc, indent=2))
    return root / COLLECTION


def _write_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically unless ``path`` holds it already: a rerun that changed nothing (an archive whose
    items were all skipped or refused) touches no file."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    write_atomic(path, text)
