"""The three PEC points (access, reception, delivery), the pipeline that joins them, and the relay."""
