"""The run context and one step per (analysis level, mode): the only layer that assembles stages."""
