"""A plugin whose import fails with an error of its own (not an ImportError)."""

raise RuntimeError("this plugin cannot be set up here")
