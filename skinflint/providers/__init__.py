"""Upstream providers behind the :class:`skinflint.interfaces.Provider` interface."""
