"""snapshot: (see DESIGN.md) builds on casfs's public API."""
