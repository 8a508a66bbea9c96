"""Storage backends, one narrow interface per concern (see :mod:`skinflint.interfaces`)."""
