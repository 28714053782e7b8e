"""Files that moepatch writes into checkpoint folders (``moepatch install``)."""
