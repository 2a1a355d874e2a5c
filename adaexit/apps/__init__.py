"""Applications built on adaexit's public API (nothing in the library imports them)."""
