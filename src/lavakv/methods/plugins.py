"""Parts and presets from other packages, through the ``lavakv.methods`` entry-point group.

A package makes its parts available to every entry point of lavakv (Python, the CLI, ``lavakv
eval``) by declaring, in its ``pyproject.toml``::

    [project.entry-points."lavakv.methods"]
    mymethod = "mypackage.lavakv_parts"

Loading the entry point imports that module (or calls the object it names, when it is
callable), and the module registers its parts with :func:`~lavakv.methods.register_score` and
friends and its presets with :func:`~lavakv.methods.register_preset`. Entry points are loaded
once, the first time a name is not found among the registered ones (or when every method is
listed), so that importing lavakv never imports other packages. A plugin that fails to load is an
error naming the entry point and its cause.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lavakv.methods"
"""The entry-point group whose entries register method parts and presets."""

_loaded: set[str] = set()


def load_plugins() -> list[str]:
    """Load every entry point of :data:`ENTRY_POINT_GROUP` not loaded yet; returns the names loaded now."""
    loaded = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        key = f"{entry.name}={entry.value}"
        if key in _loaded:
            continue
        _loaded.add(key)
        try:
            target = entry.load()
            if callable(target):
                target()
        except Exception as error:
            raise RuntimeError(
                f"the {ENTRY_POINT_GROUP!r} entry point {entry.name!r} ({entry.value}) failed to load: "
                f"{type(error).__name__}: {error}"
            ) from error
        logger.info("loaded lavakv method plugin %r (%s)", entry.name, entry.value)
        loaded.append(entry.name)
    return loaded
