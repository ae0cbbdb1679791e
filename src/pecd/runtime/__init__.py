"""The runtime around the PEC rules: processes, supervision, servers."""
