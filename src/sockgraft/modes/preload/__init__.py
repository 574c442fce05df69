"""Preload mode: unmodified dynamically linked programs through `libgraft-hijack.so` (csrc/)."""
