"""The PEC formats: pure functions over bytes and dataclasses, no I/O (design.md, "pec/")."""
