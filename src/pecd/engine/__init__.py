"""The PEC rules of the points, sans-I/O: typed inputs in, typed commands and effects out."""
